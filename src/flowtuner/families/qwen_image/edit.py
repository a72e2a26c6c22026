"""Qwen-Image-Edit (v1, 2509, 2511) on the DiT side: control images -> reference latents, and the denoiser
that runs the DiT on [noisy target | clean reference 1 | reference 2 | ...] and predicts the target only.

As diffusers' QwenImageEditPipeline / QwenImageEditPlusPipeline (0.42.1) and musubi-tuner do it:
  - each control image is resized to its VAE size (edit_sizes.vae_size: ~1 MP, multiples of 32), encoded to
    the posterior mode (diffusers: retrieve_latents(sample_mode="argmax")) and normalised per channel;
  - references are packed like the target and appended after it, never noised; `img_shapes` lists the target
    grid then each reference grid, so the DiT's RoPE gives reference k frame index k with its own centred grid;
  - 2511 (`zero_cond_t`): the DiT modulates reference tokens with t = 0 and the target with t; the flag lives
    in the DiT (diffusers config `zero_cond_t`, ComfyUI's `__index_timestep_zero__` marker) and the model's
    forward does the rest from `img_shapes`;
  - CFG: the unconditional pass sees the same references (each Conditioning carries them);
  - the dynamic shift counts target tokens only (the base geometry), as diffusers' calculate_shift does.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image

from flowtuner.errors import ConfigError, FlowtunerError
from flowtuner.families.base import Conditioning, ImageCodec, LatentGeometry
from flowtuner.families.qwen_image.dit import DiTInfo
from flowtuner.families.qwen_image.edit_sizes import check_image_count, check_version, vae_size
from flowtuner.families.qwen_image.family import PATCH, QwenImageDenoiser, pack

log = logging.getLogger(__name__)

#: where a Conditioning carries its reference latents: a list of normalised VAE latents [1 or B, 16, 1, h_i, w_i]
REFERENCE_LATENTS = "reference_latents"
#: the version whose DiT modulates reference tokens at t = 0
ZERO_COND_T_VERSION = "edit-2511"
#: PIL modes whose convert("RGB") clips instead of scaling
HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


# ------------------------------------------------------------------ reference latents from control images
def control_pixels(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """A control image as the VAE input [1, 3, height, width] in [0, 1]: resized with PIL's Lanczos, as
    diffusers' VaeImageProcessor does. An alpha channel is dropped (ComfyUI does the same); the pixels under
    it are kept, not composited. 16-bit and float images are refused: PIL's conversion clips them to 8 bits."""
    if image.mode in HIGH_BIT_MODES:
        raise ConfigError(f"control image {image.width}x{image.height} is {image.mode} (16-bit or float): save it as "
                          "8-bit RGB (e.g. PNG or JPEG) first.")
    if image.mode != "RGB":
        if "A" in image.getbands() or "transparency" in image.info:
            log.warning("control image %sx%s has an alpha channel: it is dropped, the colours under it are used",
                        image.width, image.height)
        image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    pixels = np.asarray(image).astype(np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)


def reference_latents(images: list[Image.Image], codec: ImageCodec, version: str,
                      sizes: list[tuple[int, int]] | None = None) -> list[torch.Tensor]:
    """Normalised posterior-mode latents [1, 16, 1, h_i, w_i] of each control image, resized to the version's
    VAE size (diffusers' ~1 MP rounded to 32) or to `sizes` [(width, height), ...] where another rule
    applies (musubi-tuner's --resize_control_to_* flags, edit_sizes.musubi_control_sizes)."""
    check_image_count(version, len(images))
    if sizes is None:
        sizes = [vae_size(version, *image.size) for image in images]
    if len(sizes) != len(images):
        raise ConfigError(f"{len(images)} control images but {len(sizes)} sizes for them.")
    return [codec.encode(control_pixels(image, w, h)) for image, (w, h) in zip(images, sizes)]


def with_references(cond: Conditioning, references: list[torch.Tensor]) -> Conditioning:
    """`cond` carrying `references` (a new Conditioning; the text part is shared, not copied)."""
    return Conditioning(cond.embeds, cond.mask, {**cond.extra, REFERENCE_LATENTS: list(references)})


# ------------------------------------------------------------------ zero_cond_t (2511)
def resolve_zero_cond_t(dit, info: DiTInfo | None, version: str | None) -> bool:
    """Whether reference tokens are modulated at t = 0. `version` None: as the files say (diffusers config
    `zero_cond_t`, ComfyUI's marker key); a version given wins, as musubi-tuner builds the DiT from
    --model_version, except that a file marked 2511 refuses another version (musubi asserts the same)."""
    from_files = bool(dit.config.get("zero_cond_t", False)) or bool(info is not None and info.index_timestep_zero)
    if version is None:
        return from_files
    check_version(version)
    wanted = version == ZERO_COND_T_VERSION
    if from_files and not wanted:
        raise ConfigError(f"--model_version {version}: the DiT is an Edit-2511 model (zero_cond_t / __index_timestep_zero__ "
                          f"in its files); use --model_version {ZERO_COND_T_VERSION}.")
    return wanted


def set_zero_cond_t(dit, enabled: bool) -> None:
    """Switch diffusers' zero_cond_t on a built model. The flag changes no weight, only the forward (the
    timestep batch doubled to [t, 0] and a per-token modulation index), so the loaded model is switched in
    place rather than rebuilt: LoRA hooks, attention backend and device stay as they are."""
    if bool(dit.config.get("zero_cond_t", False)) == enabled:
        return
    blocks = list(dit.transformer_blocks)
    if not hasattr(dit, "zero_cond_t") or not all(hasattr(b, "zero_cond_t") for b in blocks):
        raise FlowtunerError("this diffusers version's QwenImageTransformer2DModel has no zero_cond_t (Edit-2511); "
                             "install diffusers >= 0.36.")
    dit.zero_cond_t = enabled
    for block in blocks:
        block.zero_cond_t = enabled
    dit.register_to_config(zero_cond_t=enabled)


# ------------------------------------------------------------------ the denoiser
class QwenImageEditDenoiser(QwenImageDenoiser):
    """Predicts the target's velocity given clean reference latents in `cond.extra["reference_latents"]`.
    Noise, geometry (target tokens only: the dynamic shift's sequence length), packing and the sampler
    state are the base model's: the references never enter the sampler."""

    def __init__(self, dit, info: DiTInfo | None = None, version: str | None = None):
        super().__init__(dit, info)
        self.zero_cond_t = resolve_zero_cond_t(dit, info, version)
        set_zero_cond_t(dit, self.zero_cond_t)

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, geometry: LatentGeometry) -> torch.Tensor:
        refs = self._references(cond, x.shape[0])
        grids = [self.target_grid(geometry)] + [(1, r.shape[-2] // PATCH, r.shape[-1] // PATCH) for r in refs]
        return self.run_dit([x] + [pack(r) for r in refs], grids, sigma, cond)

    @staticmethod
    def _references(cond: Conditioning, b: int) -> list[torch.Tensor]:
        refs = cond.extra.get(REFERENCE_LATENTS)
        if refs is not None and len(refs) == 0:
            return []  # a training item without control images: trained as text-to-image, as musubi-tuner does
        if not refs:
            raise FlowtunerError("Qwen-Image-Edit needs control images: this conditioning carries no reference latents "
                                 "(give --control_image_path, or control images in the dataset).")
        out = []
        for r in refs:
            if r.dim() != 5 or r.shape[2] != 1 or r.shape[-2] % PATCH or r.shape[-1] % PATCH:
                raise FlowtunerError(f"reference latents of shape {tuple(r.shape)}: expected [B, 16, 1, h, w] with even h, w.")
            if r.shape[0] not in (1, b):
                raise FlowtunerError(f"reference latents for {r.shape[0]} images, but the batch has {b}.")
            # detached: references are clean inputs, never trained through (the loss is on the target alone)
            out.append((r.expand(b, -1, -1, -1, -1) if r.shape[0] != b else r).detach())
        return out
