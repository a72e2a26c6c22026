"""Inpainting as ComfyUI does it (KSamplerX0Inpaint), in flow form: around every model call, the kept
region (mask 0) of the input is replaced by the source re-noised to the current sigma, and the kept region
of the denoised estimate by the source itself. With Euler and a binary mask this is step for step what
diffusers' QwenImageInpaintPipeline does after each step (tests/test_img2img.py checks it); unlike a
post-step blend it also serves every other sampler and masks that change with sigma (DifferentialDiffusion).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def masked_model(model: Model, source: torch.Tensor, noise: torch.Tensor,
                 mask_at: Callable[[float], torch.Tensor]) -> Model:
    """`source`: clean latents; `noise`: the run's initial noise; `mask_at(sigma)`: 1 = regenerate."""

    def wrapped(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = float(sigma)
        m = mask_at(s)
        x_in = x * m + ((1 - s) * source + s * noise) * (1 - m)
        denoised = x_in - s * model(x_in, sigma).to(torch.float32)
        denoised = denoised * m + source * (1 - m)
        return (x - denoised) / s  # against the sampler's own x, as ComfyUI returns D to the sampler

    return wrapped
