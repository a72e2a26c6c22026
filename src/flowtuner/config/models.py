"""The model-file options every model-loading command shares."""

from __future__ import annotations

from dataclasses import dataclass

from flowtuner.config.fields import opt
from flowtuner.errors import ConfigError


@dataclass
class ModelFiles:
    dit: str | None = opt(help="DiT weights: .safetensors file (bare or model.diffusion_model. keys, bf16 / fp8 / fp8_scaled) or diffusers transformer/ folder")
    vae: str | None = opt(help="VAE weights: diffusers or original Wan-2.1 layout, file or folder")
    text_encoder: str | None = opt(help="Qwen2.5-VL weights: ComfyUI qwen_2.5_vl_7b.safetensors or a Hugging Face folder")
    tokenizer: str | None = opt(help="tokenizer folder (vocab.json + merges.txt); by default searched near the model files, the HF cache and the ComfyUI install")
    model: str | None = opt(help="Hugging Face repo root with transformer/, vae/, text_encoder/, tokenizer/; fills every slot not given")
    comfyui_dir: str | None = opt(help="ComfyUI install: bare file names resolve in models/diffusion_models, models/text_encoders, models/vae (default: $COMFYUI_PATH)")


# musubi-tuner's --model_version values (qwen_image_utils.resolve_model_version_args) and the model each names
MODEL_VERSIONS = {"original": "Qwen-Image", "edit": "Qwen-Image-Edit", "edit-2509": "Qwen-Image-Edit-2509",
                  "edit-2511": "Qwen-Image-Edit-2511", "layered": "Qwen-Image-Layered"}


@dataclass
class ModelVersion:
    """musubi-tuner's model-version switch, on every Qwen-Image command."""

    model_version: str | None = opt(help="Qwen-Image family member: " + ", ".join(MODEL_VERSIONS) + " (case-insensitive; "
                                         "default original; only original is available yet)",
                                    choices=tuple(MODEL_VERSIONS), type=str.lower)
    edit: bool = opt(False, "musubi-tuner's legacy switch for --model_version edit (used when --model_version is absent)")
    edit_plus: bool = opt(False, "musubi-tuner's legacy switch for --model_version edit-2509 (wins over --edit)")


def resolve_model_version(cfg) -> str:
    """musubi-tuner's rule (--model_version, else --edit_plus, else --edit, else original), stored back in
    cfg.model_version; a member flowtuner cannot run yet is a one-line error."""
    if cfg.model_version is not None:
        version, source = cfg.model_version.lower(), f"--model_version {cfg.model_version}"
    elif cfg.edit_plus:
        version, source = "edit-2509", "--edit_plus"
    elif cfg.edit:
        version, source = "edit", "--edit"
    else:
        version, source = "original", ""
    if version not in MODEL_VERSIONS:
        raise ConfigError(f"--model_version {cfg.model_version}: unknown; choose one of {', '.join(MODEL_VERSIONS)}.")
    cfg.model_version = version
    from flowtuner.families import VERSIONS  # the family registry decides what runs

    if version not in VERSIONS:
        why = " (the Qwen-Image-Edit family is not supported by flowtuner so far)" if version.startswith("edit") else ""
        raise ConfigError(f"{source}: {MODEL_VERSIONS[version]} is not available yet{why}; run without it for Qwen-Image "
                          "(--model_version original, also right for Qwen-Image-2512).")
    return version
