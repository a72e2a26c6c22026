"""The model-file options every model-loading command shares."""

from __future__ import annotations

from dataclasses import dataclass

from flowtuner.config.fields import opt


@dataclass
class ModelFiles:
    dit: str | None = opt(help="DiT weights: .safetensors file (bare or model.diffusion_model. keys, bf16 / fp8 / fp8_scaled) or diffusers transformer/ folder")
    vae: str | None = opt(help="VAE weights: diffusers or original Wan-2.1 layout, file or folder")
    text_encoder: str | None = opt(help="Qwen2.5-VL weights: ComfyUI qwen_2.5_vl_7b.safetensors or a Hugging Face folder")
    tokenizer: str | None = opt(help="tokenizer folder (vocab.json + merges.txt); by default searched near the model files, the HF cache and the ComfyUI install")
    model: str | None = opt(help="Hugging Face repo root with transformer/, vae/, text_encoder/, tokenizer/; fills every slot not given")
    comfyui_dir: str | None = opt(help="ComfyUI install: bare file names resolve in models/diffusion_models, models/text_encoders, models/vae (default: $COMFYUI_PATH)")
