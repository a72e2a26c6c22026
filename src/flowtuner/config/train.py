"""`flowtuner train` (LoRA) and `flowtuner finetune` (full) options: musubi-tuner's flag names."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field

from flowtuner.config.fields import opt
from flowtuner.config.models import ModelFiles, ModelPrediction, ModelVersion
from flowtuner.errors import ConfigError
from flowtuner.flow.timesteps import SAMPLERS, TimestepOptions
from flowtuner.train.optim import REFUSED, SCHEDULES, ScheduleOptions, parse_kv

log = logging.getLogger(__name__)


def int_or_float(text: str) -> int | float:
    """musubi-tuner's step counts: an int, a float (a fraction of the run when below 1) or "N%"."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int, a float or a percentage") from None
    return int(value) if value >= 1 and value.is_integer() else value


@dataclass
class TrainConfig(ModelPrediction, ModelVersion, ModelFiles):
    trains = True  # families.family_for: --prediction_type defaults to the family's training objective
    # data (model files: ModelFiles; vae / text_encoder are only needed for sample images)
    dataset_config: str | None = opt(help="dataset config whose caches are trained on (musubi-tuner TOML / JSON)")
    config_file: str | None = opt(help="TOML file with any of these options (sections are flattened); flags override it")
    # run length and precision
    max_train_steps: int = opt(1600, "optimizer steps to train")
    max_train_epochs: int | None = opt(help="epochs to train (overrides --max_train_steps)")
    max_train_samples: int | None = opt(help="samples to train (overrides --max_train_steps): steps = ceil(samples / global "
                                             "batch); the LR schedule then counts samples (docs/training.md)")
    seed: int | None = opt(help="random seed: data order, noise, timesteps (default: random, recorded)")
    mixed_precision: str = opt("no", "autocast precision", choices=("no", "fp16", "bf16"))
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step")
    fp8_base: bool = opt(False, "train: store the frozen DiT's block Linears in fp8 (float8_e4m3fn), computed in the "
                                "mixed precision; the LoRA stays fp32 (docs/memory.md); finetune refuses it")
    fp8_scaled: bool = opt(False, "train: --fp8_base (implied) with a scale per output channel of each fp8 weight, "
                                  "closer to bf16 (docs/memory.md \"fp8 scaled\"); fp8 files keep their own values")
    fp8_vl: bool = opt(False, "sample prompts: store the text encoder's decoder Linears in fp8 (about half its memory)")
    gradient_checkpointing: bool = opt(False, "recompute block activations in backward (less memory, ~30% slower)")
    blocks_to_swap: int = opt(0, "train (LoRA): keep this many DiT blocks' frozen weights in host memory (pinned on "
                                 "CUDA), streamed host->device before each use, forward and backward; at most blocks - 1 "
                                 "(docs/memory.md \"Block swap\"); finetune refuses it")
    block_swap_ring_size: int = opt(2, "with --blocks_to_swap: device buffers the streamed blocks rotate through (2: "
                                       "one computing while the next loads)")
    gradient_checkpointing_cpu_offload: bool = opt(False, "with --gradient_checkpointing: keep the block inputs it saves in "
                                                          "host memory, copied back for the recomputation (docs/memory.md)")
    split_attn: bool = opt(False, "attention per sample over its own text length, without a padding mask (needed for "
                                  "batch > 1 with flash / sage / xformers; less attention memory; docs/memory.md)")
    no_plan: bool = opt(False, "CUDA runs: do not plan and print the step's memory at start (~2-5 s; docs/memory.md)")
    max_data_loader_n_workers: int = opt(2, "cache reader threads")
    device: str | None = opt(help="device (default: cuda when available; accelerate launch decides otherwise)")
    # objective
    timestep_sampling: str | None = opt(help="sigma sampler (default: the model family's: qwen_shift for Qwen-Image; "
                                             "docs/training.md has each formula; musubi-tuner's default is sigma)",
                                        choices=tuple(SAMPLERS))
    sigmoid_scale: float | None = opt(help="scale of the normal inside sigmoid-based samplers (default 1.0)")
    discrete_flow_shift: float | None = opt(help="shift of --timestep_sampling shift (default 1.0)")
    logit_mean: float | None = opt(help="mean for logsnr / logit_normal sampling and weighting (default 0.0)")
    logit_std: float | None = opt(help="std for logsnr / logit_normal sampling and weighting (default 1.0)")
    mode_scale: float = opt(1.29, "scale of the mode weighting")
    min_timestep: float | None = opt(help="lowest timestep, 0-1000 (sigma x 1000; sigma sampling: the table index)")
    max_timestep: float | None = opt(help="highest timestep, 0-1000")
    preserve_distribution_shape: bool = opt(False, "restrict to [min, max] by redrawing instead of rescaling")
    weighting_scheme: str = opt("none", "loss weight by sigma", choices=("none", "sigma_sqrt", "cosmap", "logit_normal", "mode"))
    show_timesteps: str | None = opt(help="plot the sigma distribution (and weighting) and exit: a PNG path, `image` "
                                          "(OUTPUT_DIR/OUTPUT_NAME_timesteps.png) or `console` (a text histogram)")
    # network (LoRA)
    network_module: str = opt("lora", "LoRA implementation; musubi-tuner's networks.lora_qwen_image is accepted")
    network_dim: int = opt(4, "LoRA rank")
    network_alpha: float = opt(1.0, "LoRA alpha (scale = alpha / rank)")
    network_dropout: float = opt(0.0, "dropout on the LoRA input")
    network_args: list[str] | None = opt(help="k=v options: include_patterns=['regex', ...], exclude_patterns=[...], "
                                              "loraplus_lr_ratio=R (lora_up at R x the lr), verbose=True", nargs="*")
    network_weights: str | None = opt(help="continue this LoRA (any supported layout): trains exactly its modules, with its ranks and alphas")
    # optimisation
    optimizer_type: str = opt("adamw", "adamw, adamw8bit, adafactor, or a torch.optim class / dotted path")
    optimizer_args: list[str] | None = opt(help="k=v optimizer options (Python literals), e.g. weight_decay=0.01", nargs="*")
    learning_rate: float = opt(1e-4, "learning rate")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 = off)")
    lr_scheduler: str = opt("constant", "LR schedule: " + ", ".join(SCHEDULES) + " (transformers' / diffusers' formulas, as "
                                        "musubi-tuner); " + ", ".join(REFUSED) + " are refused with the reason")
    lr_warmup_steps: float = opt(0, "warmup: steps, a fraction of the run when below 1, or N%", type=int_or_float)
    lr_decay_steps: float = opt(0, "warmup_stable_decay: decay steps (same units as --lr_warmup_steps)", type=int_or_float)
    lr_warmup_samples: int | None = opt(help="warmup in samples instead of steps; the schedule's clock is then step x the "
                                             "global batch (Composer's \"sp\" units, docs/training.md)")
    lr_scheduler_num_cycles: int = opt(1, "cosine_with_restarts: restarts; cosine_with_min_lr / warmup_stable_decay: "
                                          "half-cosines (num_cycles / 2 full ones)")
    lr_scheduler_power: float = opt(1.0, "polynomial: power of the decay")
    lr_scheduler_timescale: int | None = opt(help="inverse_sqrt: timescale (default: the warmup steps, else 10000)")
    lr_scheduler_min_lr_ratio: float | None = opt(help="final lr as a fraction of --learning_rate: cosine_with_min_lr, "
                                                       "cosine_warmup_with_min_lr, warmup_stable_decay (default 0), rex (0.01)")
    lr_scheduler_type: str | None = opt(help="a scheduler class instead of --lr_scheduler: torch.optim.lr_scheduler name or "
                                             "dotted path, built with --lr_scheduler_args")
    lr_scheduler_args: list[str] | None = opt(help="k=v scheduler options (Python literals): for --lr_scheduler_type, or the "
                                                   "named schedule's extra parameters (e.g. lr_end=1e-6 for polynomial)", nargs="*")
    # full fine-tuning
    full_bf16: bool = opt(False, "finetune: keep the DiT weights in bf16 (needs --mixed_precision bf16); Adafactor rounds them stochastically")
    fused_backward_pass: bool = opt(False, "finetune with Adafactor: update each weight inside backward (gradients never coexist)")
    fsdp: bool = opt(False, "finetune under a launcher: shard weights, gradients and optimizer state over the processes "
                            "with FSDP2, one unit per block, fp32 master weights (docs/scale.md \"FSDP2\")")
    fsdp_reshard_after_forward: bool = opt(False, "with --fsdp: free each block's gathered weights after its forward and "
                                                  "gather them again for backward (FULL_SHARD: less memory, more traffic); "
                                                  "default keeps them (SHARD_GRAD_OP, as bigASP)")
    mem_eff_save: bool = opt(False, "write saved models tensor by tensor (peak extra RAM: one tensor)")
    save_precision: str | None = opt(help="dtype of saved weights (default: fp32 for LoRA, bf16 for full models)",
                                     choices=("fp32", "float", "fp16", "bf16"))
    # saving and resuming
    output_dir: str = opt("output", "where LoRAs, states and samples go")
    output_name: str = opt("lora", "file name stem of saved weights")
    save_format: str = opt("kohya", "LoRA file layout", choices=("kohya", "diffusers", "comfyui"))
    save_every_n_steps: int | None = opt(help="save weights every N steps")
    save_every_n_epochs: int | None = opt(help="save weights every N epochs")
    save_last_n_steps: int | None = opt(help="keep only step saves from the last N steps")
    save_last_n_epochs: int | None = opt(help="keep only the last N epoch saves")
    save_state: bool = opt(False, "save the full training state with each save (for --resume)")
    save_state_on_train_end: bool = opt(False, "save the full training state at the end")
    resume: str | None = opt(help="resume from a saved state folder")
    no_metadata: bool = opt(False, "write only the metadata musubi-tuner keeps with it (network keys, modelspec, hashes)")
    # watching
    sample_prompts: str | None = opt(help="prompt file for sample images (musubi-tuner line syntax)")
    sample_every_n_steps: int | None = opt(help="sample every N steps")
    sample_every_n_epochs: int | None = opt(help="sample every N epochs")
    sample_at_first: bool = opt(False, "sample before training")
    validation_dataset_config: str | None = opt(help="dataset config of cached validation data")
    validate_every_n_steps: int | None = opt(help="validate every N steps (default: with every save)")
    validation_timesteps: int = opt(8, "stratified sigmas per validation item")
    log_with: str | None = opt(help="tensorboard (musubi-tuner's wandb and all are refused: not available)",
                               choices=("tensorboard", "wandb", "all"))
    logging_dir: str | None = opt(help="tracker folder (default: OUTPUT_DIR/logs)")
    progress_file: str | None = opt(help="flowtuner only: write the progress as JSON lines to this file, one per optimizer "
                                         "step (step, total, loss, avg_loss, lr), for a program watching the run such "
                                         "as the ComfyUI training node (docs/training.md)")
    # the attention backend; musubi-tuner's --sdpa / --flash_attn / --xformers / --sage_attn set it too
    attn_mode: str = opt("torch", "attention backend (musubi-tuner requires one of its backend flags; flowtuner defaults to "
                                  "PyTorch SDPA)", choices=("torch", "sdpa", "flash", "sage", "xformers"))
    sdpa: bool = opt(False, "musubi-tuner's flag: same as --attn_mode sdpa")

    def __post_init__(self) -> None:
        self.fp8_base = self.fp8_base or self.fp8_scaled  # musubi-tuner asks for both; --fp8_scaled alone means the same
        if self.max_train_samples is not None and self.max_train_epochs:
            raise ConfigError("give --max_train_samples or --max_train_epochs, not both.")
        if self.lr_warmup_samples is not None and self.lr_warmup_steps:
            raise ConfigError("give --lr_warmup_samples or --lr_warmup_steps, not both.")
        for flag, least in (("max_train_samples", 1), ("lr_warmup_samples", 0)):
            if getattr(self, flag) is not None and getattr(self, flag) < least:
                raise ConfigError(f"--{flag} {getattr(self, flag)}: must be at least {least}.")

    def timestep_options(self) -> TimestepOptions:
        return TimestepOptions(self.sigmoid_scale, self.discrete_flow_shift, self.logit_mean, self.logit_std, self.min_timestep,
                               self.max_timestep, self.preserve_distribution_shape, self.weighting_scheme, self.mode_scale)

    def schedule_options(self) -> ScheduleOptions:
        return ScheduleOptions(self.lr_warmup_steps, self.lr_decay_steps, self.lr_scheduler_num_cycles, self.lr_scheduler_power,
                               self.lr_scheduler_timescale, self.lr_scheduler_min_lr_ratio, self.lr_scheduler_type or "",
                               parse_kv(self.lr_scheduler_args, "--lr_scheduler_args"), self.lr_warmup_samples,
                               self.max_train_samples)

    def network_options(self) -> NetworkOptions:
        return parse_network_args(self.network_args)


@dataclass
class NetworkOptions:
    include_patterns: list[str] = field(default_factory=list)
    exclude_patterns: list[str] = field(default_factory=list)
    loraplus_lr_ratio: float | None = None
    verbose: bool = False


def _patterns(value) -> list[str]:
    if isinstance(value, str):  # one bare pattern
        return [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"--network_args patterns: expected a list of regular expressions, got {value!r}.")
    return list(value)


def _ratio(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--network_args loraplus_lr_ratio={value!r}: expected a number.") from None


# musubi-tuner's LoRA network_args (networks/lora.py create_network): key -> (parser, None) for what flowtuner
# implements, or (None, (note, refuse)) for what it does not: refused keys are errors, the others are logged
NETWORK_ARGS: dict[str, tuple] = {
    "include_patterns": (_patterns, None),
    "exclude_patterns": (_patterns, None),
    "loraplus_lr_ratio": (_ratio, None),
    "verbose": (lambda v: v in (True, "True"), None),  # musubi-tuner compares with the string "True"
    "rank_dropout": (None, ("per-rank dropout is not available; use --network_dropout (dropout on the LoRA input)", True)),
    "module_dropout": (None, ("per-module dropout is not available; use --network_dropout (dropout on the LoRA input)", True)),
    "conv_dim": (None, ("Qwen-Image's blocks have no convolutions to adapt; ignored (as in musubi-tuner)", False)),
    "conv_alpha": (None, ("Qwen-Image's blocks have no convolutions to adapt; ignored (as in musubi-tuner)", False)),
}


def parse_network_args(items: list[str] | None) -> NetworkOptions:
    out = NetworkOptions()
    for key, value in parse_kv(items, "--network_args").items():
        if key not in NETWORK_ARGS:
            raise ConfigError(f"--network_args: unknown key {key!r}; valid: {', '.join(NETWORK_ARGS)}.")
        parse, missing = NETWORK_ARGS[key]
        if parse is not None:
            setattr(out, key, parse(value))
            continue
        note, refuse = missing
        if refuse:
            raise ConfigError(f"--network_args {key}: {note}.")
        log.info("--network_args %s: %s", key, note)
    return out
