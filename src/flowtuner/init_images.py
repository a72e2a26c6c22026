"""img2img / inpainting sources: read the image and mask, resize them to the output size, encode the image
with the family's VAE (the posterior mean, as ComfyUI and training caches do; diffusers samples the
posterior, which differs by the VAE's tiny posterior std) and bring the mask to the latent grid."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from flowtuner.errors import ConfigError
from flowtuner.families.base import ImageCodec
from flowtuner.guidance.methods import METHODS
from flowtuner.sampling import InitImage, Job


def open_image(path: str) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
        return image
    except FileNotFoundError:
        raise ConfigError(f"{path}: image not found.") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ConfigError(f"{path}: cannot read the image ({exc}); use a PNG, JPEG or WebP file.") from None


def read_image_size(path: str) -> tuple[int, int]:
    """(width, height)."""
    return open_image(path).size


def _pixels(path: str, mode: str, height: int, width: int) -> torch.Tensor:
    """[1, C, H, W] in [0, 1]; resized with Lanczos (diffusers' image processor default) when needed."""
    image = open_image(path).convert(mode)
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = array[..., None] if array.ndim == 2 else array
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


def soft_mask(job: Job) -> bool:
    return any(METHODS[name].stage == "mask" for name, _ in job.guidance_methods())


def latent_mask(path: str, height: int, width: int, latents: torch.Tensor, soft: bool) -> torch.Tensor:
    """The mask on the latent grid, broadcast over the latent channels (the latents' layout [B, C, ..., h, w]).
    Binary inpainting samples it nearest-neighbour (diffusers, which binarises at 0.5 first: the same);
    DifferentialDiffusion's soft mask is resized bilinearly, as ComfyUI does."""
    mask = _pixels(path, "L", height, width)
    size = latents.shape[-2:]
    mask = (torch.nn.functional.interpolate(mask, size=size, mode="bilinear", align_corners=False) if soft
            else torch.nn.functional.interpolate(mask, size=size))
    mask = mask.reshape(1, 1, *([1] * (latents.dim() - 4)), *size)
    return mask.expand_as(latents).contiguous()


def init_key(job: Job) -> tuple | None:
    return None if not job.image else (job.image, job.mask, job.height, job.width, soft_mask(job))


def encode_init_images(codec: ImageCodec, jobs: list[Job]) -> dict[tuple, InitImage]:
    """One encoding per distinct (image, mask, size, mask kind)."""
    out: dict[tuple, InitImage] = {}
    for job in jobs:
        key = init_key(job)
        if key is None or key in out:
            continue
        latents = codec.encode(_pixels(job.image, "RGB", job.height, job.width)).float().cpu()
        mask = latent_mask(job.mask, job.height, job.width, latents, soft_mask(job)) if job.mask else None
        out[key] = InitImage(latents, mask)
    return out


def needs_codec(jobs: list[Job]) -> bool:
    return any(job.image for job in jobs)
