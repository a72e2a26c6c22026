"""`flowtuner generate` options. Names follow musubi-tuner's qwen_image_generate_image.py."""

from __future__ import annotations

from dataclasses import dataclass

from flowtuner.config.fields import opt
from flowtuner.config.models import ModelFiles, ModelPrediction, ModelVersion
from flowtuner.config.sampling import PRESETS, SamplingConfig


@dataclass(kw_only=True)
class GenerateConfig(SamplingConfig, ModelPrediction, ModelVersion, ModelFiles):
    preset: str | None = opt(help="a bundle of sampling settings; explicit flags win: "
                                  + "; ".join(f"{k}: {', '.join(f'{n}={v:g}' if isinstance(v, float) else f'{n}={v}' for n, v in p.items())}"
                                              for k, p in PRESETS.items()), choices=tuple(PRESETS))
    prompt: str | None = opt(help="the prompt")
    negative_prompt: str | None = opt(help="negative prompt; default ' ' when guidance_scale > 1")
    image_size: list[int] | None = opt(help="image size as HEIGHT WIDTH (musubi-tuner order), multiples of 16 "
                                            "(default: 1024 1024, or the --image's size floored to multiples of 16)",
                                       nargs=2, metavar=("H", "W"))
    infer_steps: int = opt(25, "number of sampling steps (with --image: the full schedule's, of which the last strength x N run)")
    guidance_scale: float = opt(4.0, "CFG scale; <= 1 skips the unconditional pass")
    image: str | None = opt(help="img2img / inpainting: start from this image, resized to the output size")
    strength: float | None = opt(help="with --image: how much to change, in (0, 1]: the run starts int(N - N strength) steps "
                                      "into the N-step schedule, as diffusers (default 0.6)")
    mask: str | None = opt(help="with --image: inpainting mask, white = change, black = keep (binarised at 0.5; soft "
                                "with --guidance differential_diffusion)", aliases=("mask_path",))
    control_image_path: list[str] | None = opt(help="edit models: the control image(s), in order (Edit: one; Edit-2509 / "
                                                    "2511: one to three); the output size defaults to diffusers' ~1 MP "
                                                    "at the aspect ratio of the first (Edit) or last (2509 / 2511) one",
                                               nargs="+")
    resize_control_to_official_size: bool = opt(False, "edit models, musubi-tuner's rule: control images to the official "
                                                       "areas in 16-px buckets (VAE 1024x1024, text encoder 384x384), cover "
                                                       "+ centre crop (wins over --resize_control_to_image_size)")
    resize_control_to_image_size: bool = opt(False, "edit models: control images to the output size for the VAE (cover + "
                                                    "centre crop), as musubi-tuner; the text encoder gets them at the "
                                                    "version's size for that shape, as flowtuner's training caches hold them")
    seed: int | None = opt(help="random seed (default: random); image i of --num_images uses seed + i")
    save_path: str = opt("outputs", "output folder")
    output_type: str = opt("images", "what to save", choices=("images", "latent", "latent_images"))
    attn_mode: str = opt("torch", "attention backend", choices=("torch", "sdpa", "flash", "sage", "sageattn", "xformers"))
    device: str | None = opt(help="device, e.g. cuda, cuda:1, cpu (default: cuda when available)")
    text_encoder_cpu: bool = opt(False, "run the text encoder on the CPU")
    fp8_vl: bool = opt(False, "store the text encoder's decoder Linears in fp8 (about half its memory)")
    from_file: str | None = opt(help="file with one prompt per line and inline options (--w --h --d --s --g/--l --n --fs, "
                                     "and --NAME VALUE for every sampling option); see docs/sampling.md")
    num_images: int = opt(1, "images per prompt")
    lora_weight: list[str] | None = opt(help="LoRA files (kohya/musubi, diffusers, ComfyUI layouts), merged into the DiT at load")
    lora_multiplier: list[float] | None = opt(help="one multiplier per --lora_weight (default 1.0 each)")
    fp8_base: bool = opt(False, "store the DiT's block Linears in fp8 (float8_e4m3fn), computed in the weights' dtype; "
                                "fp8 files load as they are; --lora_weight LoRAs stay unmerged (docs/memory.md)",
                         aliases=("fp8",))
    fp8_scaled: bool = opt(False, "--fp8_base (implied) with a scale per output channel of each fp8 weight, closer to "
                                  "bf16 (docs/memory.md \"fp8 scaled\"); fp8 files keep their own values")
    blocks_to_swap: int = opt(0, "keep this many DiT blocks' weights in host memory (pinned on CUDA), streamed "
                                 "host->device before each use; at most blocks - 1 (docs/memory.md \"Block swap\")")
    save_merged_model: str | None = opt(help="merge the LoRAs into the DiT, save it to this .safetensors file, and stop")

    def __post_init__(self) -> None:
        self.fp8_base = self.fp8_base or self.fp8_scaled  # musubi-tuner's inference takes --fp8_scaled alone too
