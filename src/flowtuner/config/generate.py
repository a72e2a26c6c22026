"""`flowtuner generate` options. Names follow musubi-tuner's qwen_image_generate_image.py."""

from __future__ import annotations

from dataclasses import dataclass

from flowtuner.config.fields import opt
from flowtuner.config.models import ModelFiles
from flowtuner.flow.samplers import SAMPLERS
from flowtuner.flow.schedulers import SCHEDULERS
from flowtuner.guidance.methods import METHODS


@dataclass
class GenerateConfig(ModelFiles):
    prompt: str | None = opt(help="the prompt")
    negative_prompt: str | None = opt(help="negative prompt; default ' ' when guidance_scale > 1")
    image_size: list[int] = opt([1024, 1024], "image size as HEIGHT WIDTH (musubi-tuner order), multiples of 16", nargs=2, metavar=("H", "W"))
    infer_steps: int = opt(25, "number of sampling steps")
    guidance_scale: float = opt(4.0, "true-CFG scale with norm rescale; <= 1 skips the unconditional pass")
    flow_shift: float | None = opt(help="reference scheduler: a fixed SD3-style shift instead of the dynamic one from the image size")
    sampler: str = opt("euler", "sampler", choices=tuple(SAMPLERS))
    scheduler: str = opt("reference", "sigma schedule: reference (Qwen-Image's diffusers schedule) or a ComfyUI scheduler",
                         choices=("reference", *SCHEDULERS))
    guidance: list[str] | None = opt(help="guidance method NAME[:key=value,...], repeatable, applied in order (pre-CFG, CFG, post-CFG): "
                                          + ", ".join(METHODS), repeatable=True)
    shift: float | None = opt(help="ComfyUI schedulers: AuraFlow-style shift of the sigma table (default: ComfyUI's Flux-style table, mu 1.15)")
    seed: int | None = opt(help="random seed (default: random); image i of --num_images uses seed + i")
    save_path: str = opt("outputs", "output folder")
    output_type: str = opt("images", "what to save", choices=("images", "latent", "latent_images"))
    attn_mode: str = opt("torch", "attention backend", choices=("torch", "sdpa", "flash", "sage", "sageattn", "xformers"))
    device: str | None = opt(help="device, e.g. cuda, cuda:1, cpu (default: cuda when available)")
    text_encoder_cpu: bool = opt(False, "run the text encoder on the CPU")
    from_file: str | None = opt(help="file with one prompt per line and inline options --w --h --d --s --g/--l --n --fs")
    num_images: int = opt(1, "images per prompt")
    lora_weight: list[str] | None = opt(help="LoRA files (kohya/musubi, diffusers, ComfyUI layouts), merged into the DiT at load")
    lora_multiplier: list[float] | None = opt(help="one multiplier per --lora_weight (default 1.0 each)")
    save_merged_model: str | None = opt(help="merge the LoRAs into the DiT, save it to this .safetensors file, and stop")
