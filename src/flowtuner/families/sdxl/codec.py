"""The SDXL image codec: AutoencoderKL, latents x scaling_factor (0.13025 for SDXL, no shift), run in float32.

The SDXL VAE overflows in fp16 (diffusers marks it force_upcast and upcasts it for every decode), so the codec
keeps it in float32 whatever dtype it was loaded in. Encoding takes the posterior's mode, as the Qwen caches do
(a cache is then a function of the image; the recipe's noise already randomises every step)."""

from __future__ import annotations

import torch

from flowtuner.families.base import ImageCodec


class SDXLCodec(ImageCodec):
    def __init__(self, vae):
        self.vae = torch.nn.Module.to(vae, torch.float32).eval()
        self.scale = float(vae.config.scaling_factor)
        shift = getattr(vae.config, "shift_factor", None)
        self.shift = float(shift) if shift is not None else 0.0

    def _device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, 4, 1, h, w] or [B, 4, h, w] normalised latents -> images [B, 3, H, W] in [0, 1]."""
        z = latents[:, :, 0] if latents.dim() == 5 else latents
        z = z.to(self._device(), torch.float32) / self.scale + self.shift
        images = self.vae.decode(z, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1).cpu()

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> normalised latents [B, 4, 1, h, w] (the cache layout)."""
        x = images.to(self._device(), torch.float32) * 2 - 1
        z = self.vae.encode(x).latent_dist.mode()
        return ((z - self.shift) * self.scale)[:, :, None]
