"""`flowtuner finetune --fsdp`: full fine-tuning with FSDP2 (`torch.distributed.fsdp.fully_shard`), weights,
gradients and optimizer state sharded over the training processes (docs/scale.md "FSDP2").

- Wrap units: one per block (the family's `fsdp_units`), then the denoiser module as the root, which keeps
  what lies outside the blocks (embeddings, norms, output layers). The frozen text encoders and VAE are not
  part of the trained module and are never sharded.
- Numerics as bigASP: fp32 master weights gathered in fp32 (FSDP2's default MixedPrecisionPolicy), compute
  in the run's --mixed_precision autocast.
- `reshard_after_forward=False` by default (≈ FSDP1 SHARD_GRAD_OP: gathered block weights stay until backward;
  more memory, one all-gather less per block), `--fsdp_reshard_after_forward` for FULL_SHARD.
- The mesh is built explicitly on the run's device type: on a CPU the process group is gloo and nothing may
  move to CUDA (pytorch#132471).
- Training states: model and optimizer as a torch.distributed.checkpoint (DCP) folder written by every rank,
  which DCP reshards on load, so a state resumes on another number of processes; the rest of the state
  (position, schedule, generators) beside it as in any state folder. Saved weights: one full safetensors
  file gathered on rank 0.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from flowtuner.errors import ConfigError, FlowtunerError
from flowtuner.train import ddp
from flowtuner.train.state import flatten

log = logging.getLogger(__name__)
SHARDED = "sharded"  # the DCP subfolder of a state folder, and the marker in its state.json


@dataclass(frozen=True)
class FsdpOptions:
    reshard_after_forward: bool = False
    source: str = "--fsdp"  # where the request came from, for messages


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name)
    return None if value is None else value.lower() in ("1", "true", "yes")


def requested(cfg) -> FsdpOptions | None:
    """--fsdp, or an accelerate config with FSDP (`accelerate launch` exports it as ACCELERATE_USE_FSDP): honoured
    when it asks for FSDP2, refused for FSDP1 or parameter offload (flowtuner wraps and checkpoints itself)."""
    if _env_flag("ACCELERATE_USE_FSDP"):
        version = os.environ.get("FSDP_VERSION", "1")
        if version != "2":
            raise ConfigError(f"the accelerate config asks for FSDP version {version}; flowtuner runs FSDP2 only: set "
                              "`fsdp_version: 2` (`accelerate to-fsdp2` converts a config) or use --fsdp.")
        if _env_flag("FSDP_OFFLOAD_PARAMS"):
            raise ConfigError("the accelerate config sets fsdp_offload_params: true; flowtuner's FSDP2 keeps the shards on "
                              "the device: set it to false.")
        after = _env_flag("FSDP_RESHARD_AFTER_FORWARD")
        return FsdpOptions(bool(cfg.fsdp_reshard_after_forward or after), "the accelerate config (fsdp_version: 2)")
    if cfg.fsdp_reshard_after_forward and not cfg.fsdp:
        raise ConfigError("--fsdp_reshard_after_forward chooses how --fsdp shards; add --fsdp.")
    return FsdpOptions(cfg.fsdp_reshard_after_forward) if cfg.fsdp else None


def check(opts: FsdpOptions, cfg, full: bool) -> None:
    """What FSDP2 cannot run with here: one line each."""
    where = opts.source
    if not full:
        raise ConfigError(f"{where}: FSDP shards full fine-tuning (`flowtuner finetune`); a LoRA's few weights train faster "
                          "replicated: run `flowtuner train` under the same launcher without FSDP (DDP).")
    if not ddp.distributed():
        raise ConfigError(f"{where}: FSDP shards over the processes of a launcher; start with `torchrun --nproc_per_node N "
                          "-m flowtuner finetune ...` (N = 1 works) or `accelerate launch` (docs/scale.md).")
    refused = {"fused_backward_pass": "it updates each weight inside backward, before FSDP reduces its gradient",
               "full_bf16": "FSDP2 keeps fp32 master weights (bf16 compute comes from --mixed_precision bf16)",
               "sample_prompts": "sample images would need every process to join each forward; not available yet",
               "validation_dataset_config": "validation would need every process to join each forward; not available yet"}
    if cfg.mixed_precision == "fp16":
        raise ConfigError(f"--mixed_precision fp16 with {where}: the fp16 loss scaler does not handle sharded gradients "
                          "here; use --mixed_precision bf16.")
    for flag, why in refused.items():
        if getattr(cfg, flag):
            raise ConfigError(f"--{flag} with {where}: {why}; drop one of them.")


def shard(family, module: nn.Module, device: torch.device, opts: FsdpOptions) -> nn.Module:
    """fully_shard every wrap unit of the denoiser `module`, then the module itself (the root)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(torch.device(device).type, (torch.distributed.get_world_size(),))
    units = family.fsdp_units(module)
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=opts.reshard_after_forward)
    fully_shard(module, mesh=mesh, reshard_after_forward=opts.reshard_after_forward)
    log.info("FSDP2 over %d processes: %d block units + the root, reshard_after_forward=%s (%s)",
             mesh.size(), len(units), opts.reshard_after_forward, opts.source)
    return module


def autocast_forward(module: nn.Module, accelerator) -> None:
    """The run's autocast around `module`'s forward: accelerate adds it in `prepare`, which an FSDP run skips."""
    forward = module.forward

    def run(*args, **kwargs):
        with accelerator.autocast():
            return forward(*args, **kwargs)

    module.forward = run


def sync_gradients(root: nn.Module, sync: bool) -> None:
    """Reduce-scatter the gradients only at the last micro-batch of an optimizer step (accumulate unsharded before)."""
    root.set_requires_gradient_sync(sync)


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip by the norm of the whole (sharded) gradient: each rank holds a shard, the norm is over all of them."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if isinstance(norm, torch.distributed.tensor.DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def full_weights(root: nn.Module) -> dict[str, torch.Tensor]:
    """The denoiser's full state dict on rank 0 (on the host), empty elsewhere; every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def save_state(folder: Path, module: nn.Module, optimizer, rest: dict) -> Path | None:
    """Every rank writes its shards of the model and optimizer into a DCP folder; rank 0 adds `rest` (position,
    schedule, generators: no weights) and renames the whole folder into place, so a process killed at any point
    leaves the previous state whole. Returns the folder on rank 0."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    folder = Path(folder)
    tmp = folder.parent / f".{folder.name}.partial"  # one name every rank knows
    if ddp.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ddp.barrier()
    model_sd, optim_sd = get_state_dict(module, _optimizer(optimizer))
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / SHARDED))
    ddp.barrier()  # every rank's shards are on disk
    if not ddp.is_main():
        return None
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten({**rest, "format": SHARDED}, tensors)
    save_file(tensors, str(tmp / "tensors.safetensors"))
    (tmp / "state.json").write_text(json.dumps(skeleton))
    _fsync_tree(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def is_sharded(state: dict) -> bool:
    return state.get("format") == SHARDED


def load_state(folder: Path, module: nn.Module, optimizer) -> None:
    """Load a sharded state into this run's shards, whatever the number of processes that saved it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(module, _optimizer(optimizer))
    try:
        dcp.load({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(Path(folder) / SHARDED))
    except Exception as e:  # DCP reports a missing key or a different shape as a CheckpointException of every rank
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise FlowtunerError(f"--resume {folder}: its sharded weights do not match this run ({first[:200]}).") from None
    set_state_dict(module, _optimizer(optimizer), model_state_dict=model_sd, optim_state_dict=optim_sd)


def check_resume(state: dict, folder: str, fsdp: bool) -> None:
    """Sharded states resume under --fsdp, the others without it (one line otherwise)."""
    if is_sharded(state) and not fsdp:
        raise ConfigError(f"--resume {folder}: a sharded (FSDP2) state; resume it with --fsdp under a launcher "
                          "(any number of processes).")
    if fsdp and not is_sharded(state):
        raise ConfigError(f"--resume {folder}: saved by a run without FSDP; resume it without --fsdp (DDP or one process), "
                          "or start the FSDP run from its saved weights (--dit).")


@contextlib.contextmanager
def without_accelerate_fsdp():
    """accelerate would wrap the model with its own FSDP from these variables; flowtuner shards it itself."""
    saved = {k: os.environ.pop(k) for k in ("ACCELERATE_USE_FSDP",) if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)
