"""The SDXL VAE (the SD VAE architecture, latents scaled by 0.13025): any layout -> `diffusers.AutoencoderKL`."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL

from flowtuner.families.sdxl import keys as K
from flowtuner.families.sdxl.checkpoint import Source, find_component
from flowtuner.families.sdxl.configs import infer_vae
from flowtuner.weights.materialize import assign_weights, build_empty


def vae_view(src: Source) -> tuple[K.KeyTable | None, dict[str, tuple[int, ...]]]:
    keys = src.keys()
    if src.names == "diffusers":
        return None, {k: src.ckpt.shape(k) for k in keys}
    table = K.vae_table(K.VAELayout.from_ldm_keys(keys))
    return table, K.diffusers_shapes(keys, src.ckpt.shape, table, "vae")


def load_vae(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> AutoencoderKL:
    """`dtype`: None keeps the file's. SDXL's VAE overflows in fp16 (force_upcast in its config); callers that
    decode in fp16 should use the fp16-fix VAE or load it in fp32 / bf16."""
    src = find_component(path, "vae")
    table, shapes = vae_view(src)
    config = src.config if src.config and src.config.get("_class_name") == AutoencoderKL.__name__ else infer_vae(shapes)
    keys = src.keys()
    dtype = dtype or src.dtype(keys[0])
    model = build_empty(lambda: AutoencoderKL.from_config(config))
    read = src.reader(dtype)
    items = ((k, read(k)) for k in keys) if table is None else K.to_diffusers_items(keys, read, table, "vae")
    assign_weights(model, items, src.ckpt)
    return model.to(device).eval().requires_grad_(False)
