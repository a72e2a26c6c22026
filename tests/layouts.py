"""Write tiny models in the on-disk layouts users have (diffusers repo, ComfyUI single files)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from flowtuner.families.qwen_image.vae_keys import diffusers_to_wan


def legacy_te_key(key: str) -> str | None:
    """transformers >= 4.52 key -> the legacy layout of ComfyUI's qwen_2.5_vl_7b file (no lm_head)."""
    if key.startswith("lm_head."):
        return None
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return key[len("model."):]
    return key


def write_hf_repo(models: dict, tokenizer_dir: Path, root: Path) -> Path:
    models["dit"].save_pretrained(root / "transformer", max_shard_size="300KB")
    models["vae"].save_pretrained(root / "vae")
    models["te"].save_pretrained(root / "text_encoder")
    shutil.copytree(tokenizer_dir, root / "tokenizer")
    return root


def state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}


def write_comfyui_files(models: dict, comfy: Path) -> Path:
    dm, te, vae = (comfy / "models" / d for d in ("diffusion_models", "text_encoders", "vae"))
    for d in (dm, te, vae):
        d.mkdir(parents=True)
    dit = state(models["dit"])
    save_file(dit, dm / "qwen_image_tiny.safetensors")
    save_file({f"model.diffusion_model.{k}": v for k, v in dit.items()}, dm / "qwen_image_tiny_prefixed.safetensors")
    te_sd = {legacy_te_key(k): v for k, v in state(models["te"]).items()}
    save_file({k: v for k, v in te_sd.items() if k is not None}, te / "qwen_2.5_vl_tiny.safetensors")
    save_file({diffusers_to_wan(k, 2): v for k, v in state(models["vae"]).items()}, vae / "qwen_image_vae_tiny.safetensors")
    return comfy
