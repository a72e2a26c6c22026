"""Saving weights and states during a run, and watching it (trackers, validation, loss curve)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from pathlib import Path

import torch

from flowtuner.errors import ConfigError
from flowtuner.train import ddp, fsdp
from flowtuner.train.lora_formats import write_lora_file
from flowtuner.train.objective import per_sample_loss
from flowtuner.train.state import capture_rng, save_state
from flowtuner.weights import atomic_save_safetensors
from flowtuner.weights.writer import stream_save_safetensors

SAVE_DTYPES = {"fp32": torch.float32, "float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

log = logging.getLogger(__name__)


def network_args_metadata(network_args: list[str] | None) -> dict[str, str]:
    """`ss_network_args` as musubi-tuner writes it: a JSON object of each `key=value` split at its '=', the
    value kept as the raw string; no key at all without --network_args."""
    if not network_args:
        return {}
    return {"ss_network_args": json.dumps(dict(item.partition("=")[::2] for item in network_args))}


def lora_metadata(trainer, pos, network) -> dict[str, str]:
    """musubi-tuner's metadata; with --no_metadata only the keys it keeps too (what a loader filters on, the
    modelspec block, and the hashes write_lora_file adds to every file)."""
    cfg, fam = trainer.cfg, trainer.family
    dim, alpha = network.common_shape()  # a continued LoRA has the file's rank and alpha, not the flags'
    meta = {
        "ss_base_model_version": fam.base_model_version, "ss_network_module": fam.network_module,
        "ss_network_dim": str(dim), "ss_network_alpha": str(alpha), **network_args_metadata(cfg.network_args),
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": f"{fam.modelspec_architecture}/lora",
        "modelspec.implementation": fam.modelspec_implementation, "modelspec.title": cfg.output_name,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"), "modelspec.resolution": fam.modelspec_resolution,
    }
    if cfg.min_timestep is not None or cfg.max_timestep is not None:
        meta["modelspec.timestep_range"] = f"{_timestep(cfg.min_timestep, 0)},{_timestep(cfg.max_timestep, 1000)}"
    if not cfg.no_metadata:
        meta.update({
            "ss_output_name": cfg.output_name, "ss_learning_rate": str(cfg.learning_rate), "ss_optimizer": cfg.optimizer_type,
            "ss_optimizer_args": json.dumps(cfg.optimizer_args or []), "ss_lr_scheduler": cfg.lr_scheduler,
            "ss_lr_warmup_steps": str(cfg.lr_warmup_steps), "ss_max_grad_norm": str(cfg.max_grad_norm),
            "ss_network_dropout": str(cfg.network_dropout), "ss_mixed_precision": cfg.mixed_precision,
            "ss_gradient_checkpointing": str(cfg.gradient_checkpointing), "ss_fp8_base": str(cfg.fp8_base),
            "ss_gradient_accumulation_steps": str(cfg.gradient_accumulation_steps), "ss_max_train_steps": str(cfg.max_train_steps),
            "ss_timestep_sampling": cfg.timestep_sampling, "ss_weighting_scheme": cfg.weighting_scheme,
            "ss_sigmoid_scale": str(cfg.sigmoid_scale), "ss_discrete_flow_shift": str(cfg.discrete_flow_shift),
            "ss_logit_mean": str(cfg.logit_mean), "ss_logit_std": str(cfg.logit_std), "ss_mode_scale": str(cfg.mode_scale),
            "ss_seed": str(trainer.seed), "ss_steps": str(pos.step), "ss_epoch": str(pos.epoch),
            "ss_sd_model_name": Path(cfg.dit or cfg.model or "").name, "ss_training_finished_at": str(time.time()),
            "ss_num_lora_modules": str(len(network.paths)), "flowtuner_version": trainer.version,
        })
    return meta


def _timestep(value: float | None, default: int) -> int | float:
    """musubi-tuner's timestep flags are integers: 100.0 reads 100 in the metadata."""
    value = default if value is None else value
    return int(value) if float(value).is_integer() else value


class Saver:
    """Writes weights and states. With several processes only the main one writes, once every rank has
    reached the same step (a barrier); every file is written under a temporary name and renamed."""

    def __init__(self, trainer, module, network, denoiser, optimizer, schedule, gen):
        self.t, self.module, self.network, self.denoiser = trainer, ddp.unwrap(module), network, denoiser
        self.optimizer, self.schedule, self.gen = optimizer, schedule, gen
        self.out = trainer.out
        self.shard = trainer.shard
        self.sharded = getattr(trainer, "fsdp", None) is not None  # FSDP2: every rank joins gathers and state writes

    def _gathered(self) -> dict | None:
        """FSDP2: the full denoiser weights, gathered on rank 0 (every rank must call this); None otherwise."""
        return fsdp.full_weights(self.denoiser.module) if self.sharded else None

    def _weights(self, stem: str, pos, gathered: dict | None = None) -> Path:
        cfg = self.t.cfg
        path = self.out / f"{stem}.safetensors"
        dtype = SAVE_DTYPES.get(cfg.save_precision, torch.float32 if self.network is not None else torch.bfloat16)
        if self.network is not None:
            write_lora_file(self.network.weights(), path, cfg.save_format, lora_metadata(self.t, pos, self.network), dtype,
                            self.t.family.lora_names())
        else:
            meta = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": self.t.family.modelspec_architecture,
                    "modelspec.title": cfg.output_name, "ss_steps": str(pos.step)}
            state = self.t.family.full_state(self.denoiser.module, cfg, gathered)
            if cfg.mem_eff_save:
                stream_save_safetensors(state, path, meta, dtype)
            else:  # integer tensors (a checkpoint's position ids) keep their type
                atomic_save_safetensors({k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).cpu()
                                         for k, v in state.items()}, path, meta)
        log.info("saved %s", path)
        return path

    def state_now(self, pos) -> dict:
        gen_state, rng = pos.snapshot if pos.snapshot else (self.gen.get_state(), capture_rng())
        state = self.t.state(self.module, self.optimizer, self.schedule, gen_state, rng, pos)
        # position["batch"] is a global micro-batch index; these let a resume on another world size check the global batch
        state["position"].update(world_size=self.shard.world,
                                 micro_batches_per_step=ddp.micro_batches_per_step(self.t.cfg, self.shard))
        return state

    def _state(self, stem: str, pos) -> Path:
        return save_state(self.out / f"{stem}-state", self.state_now(pos))

    def _sharded_state(self, stem: str, pos) -> Path | None:
        """FSDP2, every rank: the model and optimizer shards as DCP, the rest of the state beside them."""
        rest = self.state_now(pos)
        del rest["weights"], rest["optimizer"]
        return fsdp.save_state(self.out / f"{stem}-state", self.module, self.optimizer, rest)

    def save_state_now(self, pos, tag: str) -> Path | None:
        """No barrier: an interrupted run's other ranks may be gone."""
        if self.sharded:  # the shards live on every rank, which may be gone: the last saved state stays the one
            log.warning("interrupted: an FSDP run saves no state on interrupt; resume from the last saved state")
            return None
        return self._state(f"{self.t.cfg.output_name}-{tag}", pos) if ddp.is_main() else None

    def _prune(self, pattern: str, keep_from: int) -> None:
        for path in self.out.glob(f"{self.t.cfg.output_name}-*"):
            m = re.fullmatch(pattern, path.name.removeprefix(self.t.cfg.output_name + "-"))
            if m and int(m.group(1)) < keep_from:
                if path.is_dir():
                    import shutil

                    shutil.rmtree(path)
                else:
                    path.unlink()

    def _save(self, stem: str, pos, prune: str, keep_last: int | None, counter: int) -> None:
        ddp.barrier()
        gathered = self._gathered()
        if self.sharded and self.t.cfg.save_state:
            self._sharded_state(stem, pos)
        if not ddp.is_main():
            return
        self._weights(stem, pos, gathered)
        if self.t.cfg.save_state and not self.sharded:
            self._state(stem, pos)
        if keep_last:
            self._prune(prune, counter - keep_last + 1)
        self.t.write_curves(pos)

    def save_step(self, pos) -> None:
        cfg = self.t.cfg
        self._save(f"{cfg.output_name}-step{pos.step:08d}", pos, r"step(\d{8})(-state)?(\.safetensors)?",
                   cfg.save_last_n_steps, pos.step)

    def save_epoch(self, pos) -> None:
        cfg = self.t.cfg
        self._save(f"{cfg.output_name}-{pos.epoch:06d}", pos, r"(\d{6})(-state)?(\.safetensors)?", cfg.save_last_n_epochs, pos.epoch)

    def save_final(self, pos) -> Path | None:
        ddp.barrier()
        gathered = self._gathered()
        if self.sharded and self.t.cfg.save_state_on_train_end:
            self._sharded_state(self.t.cfg.output_name, pos)
        if not ddp.is_main():
            return None
        path = self._weights(self.t.cfg.output_name, pos, gathered)
        if self.t.cfg.save_state_on_train_end and not self.sharded:
            self._state(self.t.cfg.output_name, pos)
        self.t.write_curves(pos)
        return path


class Tracker:
    """Optional TensorBoard logging and the validation schedule; with several processes, on the main one only
    (validation runs there over the whole validation set)."""

    def __init__(self, cfg, out: Path, validator=None):
        main = ddp.is_main()
        self.cfg, self.writer, self.validator = cfg, None, validator if main else None
        self.sigmas: list[float] = []
        self.val_history: list[tuple[int, float]] = []
        if cfg.log_with == "tensorboard" and main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("--log_with tensorboard needs the tensorboard package (pip install tensorboard).") from None
            self.writer = SummaryWriter(cfg.logging_dir or str(out / "logs"))

    def log(self, step: int, scalars: dict, sigma: torch.Tensor) -> None:
        if self.writer is None:
            return
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        self.sigmas += sigma.tolist()
        if step % 100 == 0:  # one histogram of the sigmas drawn over the last 100 steps
            self.writer.add_histogram("timesteps/sigma", torch.tensor(self.sigmas), step)
            self.sigmas.clear()

    def due(self, step: int) -> bool:
        every = self.cfg.validate_every_n_steps or self.cfg.save_every_n_steps
        return bool(every) and step % every == 0

    def validate(self, step: int, trainer, module) -> float:
        value = self.validator(module)
        self.val_history.append((step, value))
        log.info("step %d: validation loss %.5f", step, value)
        if self.writer is not None:
            self.writer.add_scalar("validation/loss", value, step)
        return value

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Validator:
    """Loss on cached validation data at fixed sigmas and fixed noise, so two evaluations of the same weights give
    the same number and a change between steps is the weights' doing (the bigASP recipe's test loss draws fresh
    sigmas and noise each time: a Monte-Carlo estimate; shared/reference/sdxl-flow-recipe.md §A5). Every item is
    evaluated at each of `timesteps` stratified draws (k + 0.5) / n, mapped to sigmas as training maps them, with
    noise seeded by (item key, draw index): independent of the batching, the item order and the run's seed.
    Unweighted MSE, the mean over items and sigmas."""

    def __init__(self, trainer, denoiser, data, plan, device, timesteps: int):
        if timesteps < 1:
            raise ConfigError(f"--validation_timesteps {timesteps}: must be at least 1.")
        self.t, self.denoiser, self.data, self.plan = trainer, denoiser, data, plan
        stratified = torch.tensor([(k + 0.5) / timesteps for k in range(timesteps)])
        self.device, self.sigmas = device, trainer.objective.sigmas(stratified, trainer.cfg.zero_terminal_snr).tolist()

    @staticmethod
    def noise(key: str, index: int, shape) -> torch.Tensor:
        """The noise of item `key` at sigma number `index`: the same at every evaluation and in every run."""
        digest = hashlib.sha256(f"validation|{key}|{index}".encode()).digest()
        return torch.randn(shape, generator=torch.Generator().manual_seed(int.from_bytes(digest[:8], "little")))

    @torch.no_grad()
    def __call__(self, module) -> float:
        from flowtuner.data.loader import make_loader

        module = ddp.unwrap(module)  # the wrapper's forward could start collectives the other ranks never join
        total, count = 0.0, 0
        for batch in make_loader(self.data, self.plan, epoch=0):
            x0, geometry = self.denoiser.from_latents(batch["latents"].to(torch.float32))
            x0, cond = x0.to(self.device), batch["cond"].to(self.device)
            for j, s in enumerate(self.sigmas):
                noise = torch.stack([self.noise(key, j, x0.shape[1:]) for key in batch["keys"]]).to(self.device)
                sigma = torch.full((x0.shape[0],), s, device=self.device)
                total += per_sample_loss(module, x0, noise, sigma, cond, geometry, self.t.objective).sum().item()
                count += x0.shape[0]
        return total / max(1, count)
