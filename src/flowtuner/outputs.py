"""Writing results: PNGs with their generation parameters embedded, latents as safetensors. Names
carry time and seed; files are written atomically and never overwrite an existing one."""

from __future__ import annotations

import io
import json
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from flowtuner.weights.writer import atomic_save_safetensors, atomic_write_bytes


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] in [0, 1] -> 8-bit RGB, rounded as diffusers' image processor rounds."""
    array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def parameters_text(params: dict) -> str:
    """A1111-style `parameters` chunk, which image viewers and web UIs display."""
    lines = [params["prompt"]]
    if params.get("negative_prompt") is not None:
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    shift = params.get("flow_shift")
    lines.append(
        f"Steps: {params['steps']}, Sampler: {params['sampler']}, CFG scale: {params['guidance_scale']}, "
        f"Seed: {params['seed']}, Size: {params['width']}x{params['height']}, "
        f"Flow shift: {'dynamic' if shift is None else shift}, Model: {params.get('model', '')}, "
        f"Version: flowtuner {params.get('version', '')}"
    )
    return "\n".join(lines)


def _stamp() -> str:
    now = time.time()
    return datetime.fromtimestamp(now).strftime("%Y%m%d-%H%M%S") + f"-{int(now * 1000) % 1000:03d}"


def _unique_write(folder: Path, stem: str, suffix: str, write) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(10000):
        path = folder / (f"{stem}{suffix}" if n == 0 else f"{stem}_{n}{suffix}")
        if path.exists():
            continue
        try:
            write(path)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{folder}: too many files named {stem}*{suffix}")


def save_png(image: torch.Tensor, folder: Path, params: dict, stem: str | None = None) -> Path:
    info = PngInfo()
    info.add_text("parameters", parameters_text(params))
    info.add_text("flowtuner", json.dumps(params, sort_keys=True))
    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG", pnginfo=info)
    data = buf.getvalue()
    return _unique_write(folder, stem or f"{_stamp()}_{params['seed']}", ".png",
                         lambda p: atomic_write_bytes(data, p, overwrite=False))


def save_latent(latent: torch.Tensor, folder: Path, params: dict) -> Path:
    """Key `latent`: the normalised latent [1, C, 1, h, w]; metadata: the generation parameters."""
    meta = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in params.items()}
    return _unique_write(folder, f"{_stamp()}_{params['seed']}_latent", ".safetensors",
                         lambda p: atomic_save_safetensors({"latent": latent.contiguous()}, p, meta, overwrite=False))
