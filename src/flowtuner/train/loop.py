"""The training loop, shared by LoRA (`flowtuner train`) and full fine-tuning (`flowtuner finetune`).
The objective (train/objective.py) is weighted by sigma with --weighting_scheme."""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from flowtuner import __version__
from flowtuner.config.train import TrainConfig
from flowtuner.data.config import load_dataset_config
from flowtuner.data.distributed import epoch_end, noise_seed
from flowtuner.data.loader import BatchPlan, CacheDataset, make_loader, scan_caches
from flowtuner.errors import ConfigError, FlowtunerError
from flowtuner.families import family_for
from flowtuner.families.base import Conditioning, Denoiser, LatentGeometry
from flowtuner.flow.timesteps import check_options, loss_weighting, sample_sigmas
from flowtuner.flow.weighting import WEIGHTINGS
from flowtuner.generate import pick_device, release_cache
from flowtuner import conditioning
from flowtuner.train import checkpoints, ddp, fsdp, previews
from flowtuner.train.lora import LoRANetwork, kohya_name, select_modules
from flowtuner.plan import startup_plan
from flowtuner.train.offload import check_offload_flags, enable_checkpointing
from flowtuner.train.objective import objective, per_sample_loss
from flowtuner.train.optim import GlobalBatch, make_optimizer, make_schedule, parse_kv
from flowtuner.train.progress import ProgressFile
from flowtuner.train.state import capture_rng, load_state, restore_rng
from flowtuner.weights import block_swap
from flowtuner.weights.fp8 import fp8_base, fp8_scaled, fp8_text_encoder

log = logging.getLogger(__name__)
# --network_module values every family accepts; the family adds musubi-tuner's name for its own module
NETWORK_ALIASES = ("lora", "networks.lora")


class TrainModule(nn.Module):
    """What accelerate wraps: trainable parameters plus a forward that runs the denoiser. For LoRA only
    the network is a submodule (a DDP wrapper then holds the LoRA, not the frozen base model)."""

    def __init__(self, denoiser: Denoiser, network: LoRANetwork | None):
        super().__init__()
        self._denoiser = [denoiser]
        if network is not None:
            self.network = network
        else:
            self.model = denoiser.module

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, geometry: LatentGeometry) -> torch.Tensor:
        return self._denoiser[0].predict(x, sigma, cond, geometry)


@dataclass
class Position:
    """Where the run is: optimizer steps done, epoch, next batch index within the epoch."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    history: list = field(default_factory=list)  # (step, loss) for the loss curve
    snapshot: tuple | None = None  # (noise generator state, RNG states) at this position


class StepClock:
    """Wall time per phase of the loop (data, forward, backward, optimizer, other); on CUDA each lap waits
    for the GPU so the time lands in the phase that spent it."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.totals: dict[str, float] = {}
        self.steps = 0
        self.mark = time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.totals[phase] = self.totals.get(phase, 0.0) + now - self.mark
        self.mark = now
        self.steps += phase == "other"

    def report(self) -> dict[str, float]:
        return {k: v / max(1, self.steps) for k, v in self.totals.items()}


class Trainer:
    def __init__(self, cfg: TrainConfig, full: bool = False):
        self.family = family_for(cfg)
        # --timestep_sampling not given: the family's default, resolved here so the metadata records it
        cfg = replace(cfg, timestep_sampling=cfg.timestep_sampling or self.family.default_timestep_sampling)
        self.cfg, self.full = cfg, full
        self.objective = objective(self.family.prediction_type)  # --prediction_type, resolved by family_for
        self.opts = replace(cfg.timestep_options(), shift_line=self.family.shift_line)
        check_options(cfg.timestep_sampling, self.opts)
        self.weighting = loss_weighting(cfg.timestep_sampling, cfg.weighting_scheme)  # `sigma` samples from density schemes
        self.weight_opts = {"logit_mean": cfg.logit_mean or 0.0, "logit_std": cfg.logit_std or 1.0, "mode_scale": cfg.mode_scale}
        self.net_opts = None if full else cfg.network_options()  # --network_args errors before any model loads
        check_offload_flags(cfg.gradient_checkpointing, cfg.gradient_checkpointing_cpu_offload)
        if full and cfg.fp8_base:  # musubi-tuner's qwen_image_train.py switches it off; a refusal says why
            raise ConfigError(f"--{'fp8_scaled' if cfg.fp8_scaled else 'fp8_base'}: full fine-tuning trains every DiT weight, which fp8 storage cannot update; "
                              "use it with `flowtuner train` (LoRA) or drop it (see --full_bf16).")
        if full and cfg.blocks_to_swap:  # the streamed weights would change: device -> host copies of weights and grads
            raise ConfigError("--blocks_to_swap: full fine-tuning trains the block weights, and flowtuner's block swap "
                              "streams frozen weights only (host -> device); use it with `flowtuner train` (LoRA).")
        if not full and cfg.network_module not in (*NETWORK_ALIASES, self.family.network_module):
            raise ConfigError(f"--network_module {cfg.network_module}: unknown; use lora ({self.family.network_module} is accepted).")
        self.seed = cfg.seed if cfg.seed is not None else random.randrange(2**31)
        self.out = Path(cfg.output_dir)
        self.version = __version__
        self.shard = ddp.shard_for(cfg)  # this process among the training processes (docs/scale.md)
        self.fsdp = fsdp.requested(cfg)  # --fsdp or an accelerate config with fsdp_version: 2
        self.resumed = load_state(Path(cfg.resume)) if cfg.resume else None
        if self.resumed is not None:
            self.seed = self.resumed["seed"]  # the data order depends on it
            ddp.check_resume(self.resumed, cfg, self.shard)
            fsdp.check_resume(self.resumed, cfg.resume, self.fsdp is not None)

    def timestep_draws(self) -> tuple[torch.Tensor, tuple[int, int], int]:
        """100k training sigmas at the first dataset's resolution (else 1024x1024), the resolution, its tokens."""
        res = load_dataset_config(self.cfg.dataset_config)[0].resolution if self.cfg.dataset_config else (1024, 1024)
        tokens = (res[0] // self.family.size_step) * (res[1] // self.family.size_step)
        sigmas = sample_sigmas(self.cfg.timestep_sampling, 100_000, torch.Generator().manual_seed(self.seed), self.opts, tokens)
        return sigmas, res, tokens

    def show_timesteps(self, path: str) -> Path:
        """A histogram of the timestep draws with the loss weighting drawn over it (scaled to the same height)."""
        from flowtuner.plots import histogram

        sigmas, res, tokens = self.timestep_draws()
        grid = torch.linspace(0.005, 0.995, 199)
        weights = WEIGHTINGS[self.weighting](grid, self.weight_opts)
        hist = torch.histc(sigmas, 50, 0, 1) / len(sigmas) * 50
        overlay = (grid.tolist(), (weights / weights.max() * hist.max()).tolist())
        title = f"{self.cfg.timestep_sampling} at {res[0]}x{res[1]} ({tokens} tokens); red: {self.weighting} weighting"
        return histogram(sigmas.tolist(), path, title, overlay=overlay, xlabel="sigma")

    # ---------------------------------------------------------------- setup
    def _data(self):
        if not self.cfg.dataset_config:
            raise ConfigError("no --dataset_config given.")
        datasets = load_dataset_config(self.cfg.dataset_config)
        items = scan_caches(datasets, self.family)
        return CacheDataset(items, self.family), BatchPlan(items, datasets, self.seed)

    def _global_batch(self, plan: BatchPlan) -> GlobalBatch:
        return GlobalBatch(tuple(sorted(set(plan.batch_sizes.values()))), self.cfg.gradient_accumulation_steps, self.shard.world)

    def _total_steps(self, plan: BatchPlan) -> int:
        per_epoch = self.shard.batches_per_epoch(len(plan))  # micro-batches of each process
        if self.cfg.max_train_samples:
            return self._global_batch(plan).steps(self.cfg.max_train_samples)
        if self.cfg.max_train_epochs:
            return math.ceil(per_epoch * self.cfg.max_train_epochs / self.cfg.gradient_accumulation_steps)
        return self.cfg.max_train_steps

    def _network(self, denoiser: Denoiser) -> LoRANetwork | None:
        if self.full:
            if self.cfg.full_bf16 and self.cfg.mixed_precision != "bf16":
                raise ConfigError("--full_bf16 needs --mixed_precision bf16.")
            # full fine-tuning keeps fp32 master weights unless --full_bf16
            # nn.Module.to, not diffusers' override, which warns about fp32-only modules the model does not have
            nn.Module.to(denoiser.module, torch.bfloat16 if self.cfg.full_bf16 else torch.float32).requires_grad_(True)
            return None
        if self.cfg.full_bf16 or self.cfg.fused_backward_pass:
            raise ConfigError("--full_bf16 and --fused_backward_pass are for `flowtuner finetune`, not LoRA training.")
        net = self.net_opts
        args = parse_kv(self.cfg.network_args, "--network_args")
        model = denoiser.module
        paths = select_modules(model, self.family.lora_default_targets(model), net.include_patterns, net.exclude_patterns)
        if self.cfg.network_weights:  # the file decides the modules, ranks and alphas
            from flowtuner.train.lora_formats import read_lora_file

            weights = read_lora_file(self.cfg.network_weights, *self.family.lora_names())
            patterned = "include_patterns" in args or "exclude_patterns" in args
            network = LoRANetwork.from_weights(model, weights, f"--network_weights {self.cfg.network_weights}",
                                               self.cfg.network_dropout, paths if patterned else None)
            log.info("continuing %s: %d modules, rank %d / alpha %g (most common)", self.cfg.network_weights,
                     len(network.paths), *network.common_shape())
        else:
            network = LoRANetwork(model, paths, self.cfg.network_dim, self.cfg.network_alpha, self.cfg.network_dropout)
        if net.verbose:  # --network_args verbose=True: the targeted modules, as musubi-tuner lists them
            for path in network.paths:
                log.info("LoRA module %s: rank %d, alpha %g", kohya_name(path), network.module_of(path).rank,
                         network.module_of(path).alpha)
        return network.to(next(model.parameters()).device).attach()

    # ---------------------------------------------------------------- one step
    def loss(self, module: nn.Module, denoiser: Denoiser, batch: dict, gen: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
        x0, geometry = denoiser.from_latents(batch["latents"].to(torch.float32))
        noise = torch.randn(x0.shape, generator=gen)
        sigma = self.objective.sigmas(sample_sigmas(self.cfg.timestep_sampling, x0.shape[0], gen, self.opts, geometry.image_tokens),
                                      self.cfg.zero_terminal_snr)
        x0, noise, sigma_d = x0.to(device), noise.to(device), sigma.to(device)
        per_sample = per_sample_loss(module, x0, noise, sigma_d, batch["cond"].to(device), geometry, self.objective)
        weights = WEIGHTINGS[self.weighting](sigma_d, self.weight_opts)
        return (weights * per_sample).mean(), sigma

    # ---------------------------------------------------------------- run
    def run(self) -> int:
        try:
            return self._run()
        finally:
            # accelerate keeps one state per process and refuses a second run with other settings (a demo,
            # a notebook or the tests train several times in one process)
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(reset_partial_state=True)
            release_cache()  # the models went with _run's frame

    def _run(self) -> int:
        cfg = self.cfg
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        set_seed(self.seed)  # LoRA init and dropout draw from the global generators
        data, plan = self._data()
        total = self._total_steps(plan)
        paths = self.family.resolve_paths(dit=cfg.dit, vae=cfg.vae, text_encoder=cfg.text_encoder, tokenizer=cfg.tokenizer,
                                          model=cfg.model, comfyui_dir=cfg.comfyui_dir)
        jobs = previews.sample_jobs(cfg.sample_prompts, self.family) if cfg.sample_prompts else []
        self.family.validate(paths, ("dit",) + (("text_encoder", "vae") if jobs else ()))
        with fsdp.without_accelerate_fsdp() if self.fsdp else contextlib.nullcontext():
            accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                                      cpu=(cfg.device == "cpu") or (cfg.device is None and not torch.cuda.is_available()))
        ddp.setup(accelerator, self.shard)
        if self.fsdp:
            fsdp.check(self.fsdp, cfg, self.full)
        # several processes: each on the device accelerate gives it, whatever --device names
        device = accelerator.device if cfg.device is None or self.shard.world > 1 else pick_device(cfg.device)
        jobs = jobs if accelerator.is_main_process else []  # previews: main process only
        if not cfg.no_plan and accelerator.is_main_process:  # before the models load: a run that cannot fit says so
            startup_plan(self.family, paths, cfg, "finetune" if self.full else "train", torch.device(device))
        conds = self._encode_samples(paths, jobs, device) if jobs else {}
        with fp8_base(cfg.fp8_base), fp8_scaled(cfg.fp8_scaled):
            # block swap: loaded on the host, then spread over host and device
            denoiser = self.family.load_denoiser(paths, torch.device("cpu") if cfg.blocks_to_swap else device,
                                                 "sdpa" if cfg.sdpa else cfg.attn_mode)
        if cfg.blocks_to_swap:
            block_swap.enable(denoiser, cfg.blocks_to_swap, device, cfg.block_swap_ring_size)
        if cfg.split_attn:
            self.family.split_attention(denoiser.module)
        if cfg.gradient_checkpointing:  # --gradient_checkpointing_cpu_offload: the saved block inputs on the host
            enable_checkpointing(denoiser.module, self._offload_blocks(denoiser) if cfg.gradient_checkpointing_cpu_offload
                                 else (), device, cfg.gradient_checkpointing_cpu_offload)
        network = self._network(denoiser)
        module = TrainModule(denoiser, network)
        trained = [n for n, p in module.named_parameters() if p.requires_grad]  # also those the probe freezes
        if ddp.distributed():  # DDP (even of one process) fails on a parameter without gradient: a probe finds and freezes them
            probe = lambda: self.loss(module, denoiser, data[plan.epoch(0)[0][:1]], torch.Generator().manual_seed(0), device)[0]  # noqa: E731
            ddp.freeze_unreached(module, probe, accelerator.autocast)
        if self.fsdp:  # the parameters become sharded ones (same names), before the optimizer sees them
            fsdp.shard(self.family, denoiser.module, device, self.fsdp)
        named = dict(module.named_parameters())
        params = [named[n] for n in trained]
        ratio = network is not None and self.net_opts.loraplus_lr_ratio
        groups = network.loraplus_groups(cfg.learning_rate, ratio) if ratio else params  # LoRA+: lora_up at lr x ratio
        optimizer = make_optimizer(cfg.optimizer_type, groups, cfg.learning_rate, parse_kv(cfg.optimizer_args, "--optimizer_args"))
        opts = cfg.schedule_options()
        if opts.in_samples:  # the schedule's clock: samples trained = step x the global batch
            opts = replace(opts, samples_per_step=self._global_batch(plan).samples)
        schedule = make_schedule(cfg.lr_scheduler, optimizer, total, opts)
        fused = self._fused(optimizer, params)
        if self.fsdp:  # accelerate wraps the optimizer (accumulation) and would wrap the module in DDP
            optimizer = accelerator.prepare(optimizer)
            fsdp.autocast_forward(module, accelerator)
        else:
            module, optimizer = accelerator.prepare(module, optimizer)
        gen = torch.Generator().manual_seed(self.seed)
        pos = self._resume(module, optimizer, schedule, gen) if self.resumed else Position()
        codec = self.family.load_codec(paths, device) if jobs else None
        if jobs:  # an edit model's --ci control images, encoded once for every preview
            conds = conditioning.with_controls(self.family, conds, codec)
        saver = checkpoints.Saver(self, module, network, denoiser, optimizer, schedule, gen)
        tracker = checkpoints.Tracker(cfg, self.out, self._validator(denoiser, device))
        self.tracker = tracker
        sample = lambda tag: previews.write_samples(self.family, denoiser, codec, jobs, conds, self.out / "sample",  # noqa: E731
                                                    cfg.output_name, tag) if jobs else None
        if cfg.sample_at_first and pos.step == 0:
            self._eval_mode(module, lambda: sample("000000"))
        log.info("training %d steps (%d batches per epoch), seed %d; %s", total, len(plan), self.seed,
                 self._global_batch(plan).describe())
        smooth = deque(maxlen=50)
        clock = StepClock(device)
        bar = tqdm(total=total, initial=pos.step, desc="training", unit="step", disable=not accelerator.is_main_process)
        progress = ProgressFile(cfg.progress_file, total, pos.step, accelerator.is_main_process)
        last_good = Position(pos.step, pos.epoch, pos.batch, pos.history, (gen.get_state(), capture_rng()))
        try:
            while pos.step < total:
                start = pos.batch
                for batch in make_loader(data, plan, pos.epoch, start, cfg.max_data_loader_n_workers, shard=self.shard):
                    clock.lap("data")
                    # noise and timesteps of a global micro-batch: the same whichever rank trains it
                    gen.manual_seed(noise_seed(self.seed, pos.epoch, pos.batch + self.shard.rank))
                    pos.batch += self.shard.world  # a global micro-batch index
                    with accelerator.accumulate(module):
                        loss, sigma = self.loss(module, denoiser, batch, gen, device)
                        clock.lap("forward")
                        if not torch.isfinite(loss):
                            raise FlowtunerError(
                                f"the loss became {loss.item()} at step {pos.step + 1} (items {', '.join(batch['keys'])}); "
                                "stopped without updating the weights; the last saved checkpoint is intact. "
                                "Lower --learning_rate or check those items.")
                        if self.fsdp:
                            fsdp.sync_gradients(denoiser.module, accelerator.sync_gradients)
                        accelerator.backward(loss)  # with --fused_backward_pass the weights update in here
                        clock.lap("backward")
                        if accelerator.sync_gradients and cfg.max_grad_norm and not fused:
                            clip = fsdp.clip_grad_norm_ if self.fsdp else accelerator.clip_grad_norm_
                            clip(params, cfg.max_grad_norm)
                        optimizer.step()  # a no-op after a fused backward: every gradient is already used and freed
                        optimizer.zero_grad(set_to_none=True)
                        clock.lap("optimizer")
                    if not accelerator.sync_gradients:
                        continue
                    schedule.step()
                    pos.step += 1
                    value = accelerator.reduce(loss.detach(), "mean").item()  # over the processes' micro-batches
                    smooth.append(value)
                    pos.history.append((pos.step, value))
                    pos.snapshot = (gen.get_state(), capture_rng())
                    last_good = Position(pos.step, pos.epoch, pos.batch, pos.history, pos.snapshot)
                    lr = schedule.get_last_lr()[0]
                    bar.set_postfix(loss=f"{sum(smooth) / len(smooth):.4f}", lr=f"{lr:.2e}")
                    bar.update()
                    progress.step(pos.step, value, sum(smooth) / len(smooth), lr)
                    tracker.log(pos.step, {"loss": value, "lr": lr}, sigma)
                    clock.lap("other")
                    self._every_step(pos, saver, tracker, sample, module)
                    clock.lap("saving/sampling")
                    if pos.step >= total:
                        break
                if pos.batch >= epoch_end(len(plan), start, self.shard.world):  # the epoch is complete (also when its last batch ended the run)
                    pos.epoch, pos.batch = pos.epoch + 1, 0
                    last_good = Position(pos.step, pos.epoch, 0, pos.history, pos.snapshot)
                    self._every_epoch(pos, saver, sample, module)
        except KeyboardInterrupt:
            bar.close()
            progress.close()
            folder = saver.save_state_now(last_good, tag="interrupted")
            if folder is not None:  # the main process writes
                print(f"interrupted: state saved to {folder}; continue with --resume {folder}")
            raise
        bar.close()
        progress.close()
        self.timings = clock.report()
        log.info("time per step: %s", ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in self.timings.items()))
        saver.save_final(pos)
        tracker.close()
        return 0

    def _fused(self, optimizer, params):
        cfg = self.cfg
        if not cfg.fused_backward_pass:
            return None
        from flowtuner.train.adafactor import Adafactor, FusedBackward

        if not isinstance(optimizer, Adafactor):
            raise ConfigError("--fused_backward_pass needs --optimizer_type adafactor.")
        if cfg.max_grad_norm:
            raise ConfigError("--fused_backward_pass updates each weight as soon as its gradient exists, so no global "
                              "gradient norm can be clipped; add --max_grad_norm 0.")
        if cfg.gradient_accumulation_steps > 1:
            raise ConfigError("--fused_backward_pass frees each gradient after its update; use --gradient_accumulation_steps 1.")
        return FusedBackward(optimizer, params)

    def _eval_mode(self, module: nn.Module, fn):
        module.eval()
        try:
            return fn()
        finally:
            module.train()

    def _every_step(self, pos: Position, saver, tracker, sample, module) -> None:
        cfg = self.cfg
        if cfg.save_every_n_steps and pos.step % cfg.save_every_n_steps == 0:
            saver.save_step(pos)
        if cfg.sample_every_n_steps and pos.step % cfg.sample_every_n_steps == 0:
            self._eval_mode(module, lambda: sample(f"{pos.step:06d}"))
        if tracker.validator and tracker.due(pos.step):
            self._eval_mode(module, lambda: tracker.validate(pos.step, self, module))

    def _every_epoch(self, pos: Position, saver, sample, module) -> None:
        cfg = self.cfg
        if cfg.save_every_n_epochs and pos.epoch % cfg.save_every_n_epochs == 0:
            saver.save_epoch(pos)
        if cfg.sample_every_n_epochs and pos.epoch % cfg.sample_every_n_epochs == 0:
            self._eval_mode(module, lambda: sample(f"e{pos.epoch:06d}"))

    def _encode_samples(self, paths, jobs, device) -> dict[str, Conditioning]:
        with fp8_text_encoder(self.cfg.fp8_vl):
            encoder = self.family.load_text_encoder(paths, device)
        conds = conditioning.encode(encoder, conditioning.keys_of(jobs, self.family), self.family)
        del encoder
        release_cache()
        return conds

    def _resume(self, module, optimizer, schedule, gen) -> Position:
        state, folder = self.resumed, self.cfg.resume
        module = ddp.unwrap(module)  # the saved keys carry no DDP prefix
        if self.fsdp:  # weights and optimizer from the sharded folder, resharded for this world size
            fsdp.load_state(Path(folder), module, optimizer)
        else:
            missing = set(module.state_dict()) - set(state["weights"])
            if missing:
                raise FlowtunerError(f"--resume {folder}: the saved weights do not match this run (e.g. {sorted(missing)[0]}).")
            module.load_state_dict(state["weights"], strict=False)
            optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        gen.set_state(state["generator"])
        restore_rng(state["rng"])
        p = state["position"]
        log.info("resumed from %s at step %d (epoch %d, batch %d)", folder, p["step"], p["epoch"], p["batch"])
        return Position(p["step"], p["epoch"], p["batch"], [tuple(h) for h in p["history"]],
                        (state["generator"], state["rng"]))

    def _offload_blocks(self, denoiser: Denoiser) -> nn.Module:
        """The block list whose checkpointed inputs --gradient_checkpointing_cpu_offload keeps on the host."""
        try:
            return denoiser.module.get_submodule(self.family.lora_blocks)
        except AttributeError:
            raise ConfigError(f"--gradient_checkpointing_cpu_offload: {self.family.name} has no block list to offload; "
                              "use --gradient_checkpointing alone.") from None

    def _validator(self, denoiser, device):
        if not self.cfg.validation_dataset_config:
            return None
        datasets = load_dataset_config(self.cfg.validation_dataset_config)
        items = scan_caches(datasets, self.family)
        return checkpoints.Validator(self, denoiser, CacheDataset(items, self.family), BatchPlan(items, datasets, 0), device,
                                     self.cfg.validation_timesteps)

    def write_curves(self, pos: Position) -> None:
        """output_dir/loss.png: training loss (raw and a 50-step mean) and the validation loss."""
        from flowtuner.plots import line_plot

        if not pos.history:
            return
        steps, losses = zip(*pos.history)
        window = [sum(losses[max(0, i - 49): i + 1]) / len(losses[max(0, i - 49): i + 1]) for i in range(len(losses))]
        series = {"loss": (steps, losses), "loss (50-step mean)": (steps, window)}
        tracker = getattr(self, "tracker", None)
        if tracker is not None and tracker.val_history:
            series["validation"] = tuple(zip(*tracker.val_history))
        line_plot(series, self.out / "loss.png", f"{self.cfg.output_name}: loss", "step", "loss")

    def state(self, module, optimizer, schedule, gen_state, rng, pos: Position) -> dict:
        return {"weights": dict(module.state_dict()), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(), "generator": gen_state, "rng": rng, "seed": self.seed,
                "position": {"step": pos.step, "epoch": pos.epoch, "batch": pos.batch, "history": pos.history},
                "version": __version__, "time": time.time()}
