"""`flowtuner train` (LoRA) and `flowtuner finetune` (full) options: musubi-tuner's flag names."""

from __future__ import annotations

from dataclasses import dataclass

from flowtuner.config.fields import opt
from flowtuner.config.models import ModelFiles


@dataclass
class TrainConfig(ModelFiles):
    # data (model files: ModelFiles; vae / text_encoder are only needed for sample images)
    dataset_config: str | None = opt(help="dataset config whose caches are trained on (musubi-tuner TOML / JSON)")
    config_file: str | None = opt(help="TOML file with any of these options (sections are flattened); flags override it")
    # run length and precision
    max_train_steps: int = opt(1600, "optimizer steps to train")
    max_train_epochs: int | None = opt(help="epochs to train (overrides --max_train_steps)")
    seed: int | None = opt(help="random seed: data order, noise, timesteps (default: random, recorded)")
    mixed_precision: str = opt("no", "autocast precision", choices=("no", "fp16", "bf16"))
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step")
    gradient_checkpointing: bool = opt(False, "recompute block activations in backward (less memory, ~30% slower)")
    max_data_loader_n_workers: int = opt(2, "cache reader threads")
    device: str | None = opt(help="device (default: cuda when available; accelerate launch decides otherwise)")
    # objective
    timestep_sampling: str = opt("qwen_shift", "sigma sampler: uniform, sigmoid, shift, flux_shift, qwen_shift, logsnr, qinglong_qwen, logit_normal")
    sigmoid_scale: float | None = opt(help="scale of the normal inside sigmoid-based samplers (default 1.0)")
    discrete_flow_shift: float | None = opt(help="shift of --timestep_sampling shift (default 1.0)")
    logit_mean: float | None = opt(help="mean for logsnr / logit_normal sampling and weighting (default 0.0)")
    logit_std: float | None = opt(help="std for logsnr / logit_normal sampling and weighting (default 1.0)")
    mode_scale: float = opt(1.29, "scale of the mode weighting")
    min_timestep: float | None = opt(help="lowest timestep, 0-1000 (sigma x 1000)")
    max_timestep: float | None = opt(help="highest timestep, 0-1000")
    preserve_distribution_shape: bool = opt(False, "restrict to [min, max] by redrawing instead of rescaling")
    weighting_scheme: str = opt("none", "loss weight by sigma", choices=("none", "sigma_sqrt", "cosmap", "logit_normal", "mode"))
    show_timesteps: str | None = opt(help="write a PNG of the sigma distribution (and weighting) to this path and exit")
    # network (LoRA)
    network_module: str = opt("lora", "LoRA implementation; musubi-tuner's networks.lora_qwen_image is accepted")
    network_dim: int = opt(4, "LoRA rank")
    network_alpha: float = opt(1.0, "LoRA alpha (scale = alpha / rank)")
    network_dropout: float = opt(0.0, "dropout on the LoRA input")
    network_args: list[str] | None = opt(help="k=v options: include_patterns=['regex', ...], exclude_patterns=[...]")
    network_weights: str | None = opt(help="start from this LoRA (any supported layout)")
    # optimisation
    optimizer_type: str = opt("adamw", "adamw, adamw8bit, adafactor, or a torch.optim class / dotted path")
    optimizer_args: list[str] | None = opt(help="k=v optimizer options (Python literals), e.g. weight_decay=0.01")
    learning_rate: float = opt(1e-4, "learning rate")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 = off)")
    lr_scheduler: str = opt("constant", "constant, constant_with_warmup, linear, cosine, cosine_with_min_lr")
    lr_warmup_steps: float = opt(0, "warmup: steps, or a fraction of the run when < 1")
    lr_scheduler_min_lr_ratio: float = opt(0.0, "cosine_with_min_lr: final lr as a fraction of --learning_rate")
    # full fine-tuning
    full_bf16: bool = opt(False, "finetune: keep the DiT weights in bf16 (needs --mixed_precision bf16); Adafactor rounds them stochastically")
    fused_backward_pass: bool = opt(False, "finetune with Adafactor: update each weight inside backward (gradients never coexist)")
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
    no_metadata: bool = opt(False, "write only the metadata needed to load the LoRA")
    # watching
    sample_prompts: str | None = opt(help="prompt file for sample images (musubi-tuner line syntax)")
    sample_every_n_steps: int | None = opt(help="sample every N steps")
    sample_every_n_epochs: int | None = opt(help="sample every N epochs")
    sample_at_first: bool = opt(False, "sample before training")
    validation_dataset_config: str | None = opt(help="dataset config of cached validation data")
    validate_every_n_steps: int | None = opt(help="validate every N steps (default: with every save)")
    validation_timesteps: int = opt(8, "stratified sigmas per validation item")
    log_with: str | None = opt(help="tensorboard", choices=("tensorboard",))
    logging_dir: str | None = opt(help="tracker folder (default: OUTPUT_DIR/logs)")
    # accepted for musubi-tuner command lines; the attention backend is chosen with --attn_mode
    attn_mode: str = opt("torch", "attention backend", choices=("torch", "sdpa", "flash", "sage", "xformers"))
    sdpa: bool = opt(False, "musubi-tuner's flag: same as --attn_mode sdpa")
