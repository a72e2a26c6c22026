"""Training with several processes (torchrun, `accelerate launch --multi_gpu`): DDP over the trainable
parameters only, one process that writes, and the checks that keep a run the same across world sizes
(docs/scale.md)."""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from flowtuner.data.distributed import Shard
from flowtuner.errors import ConfigError
from flowtuner.train.state import capture_rng, restore_rng

log = logging.getLogger(__name__)


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_main() -> bool:
    """Whether this process writes files (weights, states, previews, logs): rank 0, or the only process."""
    return not distributed() or torch.distributed.get_rank() == 0


def barrier() -> None:
    if distributed():
        torch.distributed.barrier()


def unwrap(module: nn.Module) -> nn.Module:
    """The module under a DDP wrapper: its state dict has the same keys for any world size."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def shard_for(cfg) -> Shard:
    """This process's shard, refusing what cannot run on several processes."""
    shard = Shard.from_env()
    if shard.world > 1 and cfg.fused_backward_pass:
        raise ConfigError("--fused_backward_pass updates each weight from this process's gradient before the processes "
                          "average them; drop it when training on several processes.")
    return shard


def setup(accelerator, shard: Shard) -> None:
    """Check that accelerate sees the processes the launcher announced; other ranks log warnings only."""
    if (accelerator.process_index, accelerator.num_processes) != (shard.rank, shard.world):
        raise ConfigError(f"the launcher set RANK {shard.rank} / WORLD_SIZE {shard.world}, but accelerate runs process "
                          f"{accelerator.process_index} of {accelerator.num_processes}; launch with torchrun or "
                          "`accelerate launch --multi_gpu` (docs/scale.md).")
    if not accelerator.is_main_process:
        logging.getLogger("flowtuner").setLevel(logging.WARNING)


def freeze_unreached(module: nn.Module, loss_fn, autocast=contextlib.nullcontext) -> list[str]:
    """Stop training the parameters whose gradient the loss never reaches, found by one probe
    forward/backward (`loss_fn`). DDP expects a gradient for every trainable parameter at every step and
    fails otherwise. Qwen-Image's last block is an example: its text stream (txt_mlp, to_add_out) feeds
    nothing after it. In a single process such a parameter keeps its gradient None and the optimizer skips
    it, so freezing it trains the same weights; it stays in the optimizer and in the saved files. The probe
    restores the random generators, so the run draws what it would have drawn without it; it runs under the
    run's `autocast`, so it sees the graph training will."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    rng = capture_rng()
    try:
        with autocast():
            loss = loss_fn()
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    finally:
        restore_rng(rng)
    unreached = [n for (n, p), g in zip(named, grads) if g is None]
    for n, p in named:
        if n in unreached:
            p.requires_grad_(False)
    if unreached:
        log.info("%d of %d trainable tensors get no gradient from the loss (e.g. %s); not trained, as in one process",
                 len(unreached), len(named), unreached[0])
    return unreached


def micro_batches_per_step(cfg, shard: Shard) -> int:
    """The global batch in micro-batches: --gradient_accumulation_steps counts per process, as in accelerate."""
    return cfg.gradient_accumulation_steps * shard.world


def check_resume(state: dict, cfg, shard: Shard) -> None:
    """A resumed run must keep the global batch of the run it continues: the same steps then see the same
    data, whatever the number of processes. States from before world sizes were recorded count as one process
    with unknown accumulation and are not checked."""
    saved = state["position"].get("micro_batches_per_step")
    if saved is None:
        return
    now = micro_batches_per_step(cfg, shard)
    if saved == now:
        return
    where = f"--resume {cfg.resume}: the run trained {saved} micro-batches per optimizer step"
    if saved % shard.world:
        raise ConfigError(f"{where}, which {shard.world} processes cannot share evenly; resume with a number of "
                          f"processes that divides {saved}.")
    raise ConfigError(f"{where}, this one {now} (--gradient_accumulation_steps {cfg.gradient_accumulation_steps} x "
                      f"{shard.world} processes); use --gradient_accumulation_steps {saved // shard.world}.")
