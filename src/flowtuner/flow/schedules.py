"""Sigma schedules as pure functions. Each returns `steps + 1` float32 sigmas ending in 0.

The reference (diffusers FlowMatchEulerDiscreteScheduler as configured by Qwen-Image) computes in
float32 numpy; these functions do the same so schedules match it bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def dynamic_mu(
    image_tokens: float, base_len: float = 256, max_len: float = 8192, base_shift: float = 0.5, max_shift: float = 0.9
) -> float:
    """Resolution-dependent shift exponent: a line through (base_len, base_shift), (max_len, max_shift).
    The one copy of this line: diffusers' calculate_shift, musubi-tuner's get_lin_function and ComfyUI's
    ModelSamplingFlux all compute it as m x + (y1 - m x1), so the same float arithmetic serves all three.
    The defaults are Qwen-Image's scheduler config (256 / 8192 tokens, 0.5 / 0.9)."""
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_tokens * m + (base_shift - m * base_len)


def exponential_shift(sigmas: np.ndarray, mu: float) -> np.ndarray:
    """diffusers' time_shift: e^mu / (e^mu + 1/sigma - 1), i.e. `sd3_shift` with shift e^mu in the
    reference's own float arithmetic (kept so reference schedules match bit for bit)."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def sd3_shift(sigmas, shift: float):
    """shift s / (1 + (shift - 1) s): SD3's shift, musubi-tuner's timestep shift and ComfyUI's
    time_snr_shift (numpy arrays or tensors)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def stretch_to_terminal(sigmas: np.ndarray, terminal: float) -> np.ndarray:
    """Rescale 1 - sigma so the last sigma is exactly `terminal`.

    A one-step schedule has last sigma 1, where the reference divides by zero and returns NaN; there
    is nothing to stretch, so it is returned unchanged."""
    one_minus = 1 - sigmas
    if one_minus[-1] == 0:
        return sigmas
    return 1 - one_minus / (one_minus[-1] / (1 - terminal))


def reference_sigmas(
    steps: int, image_tokens: int, flow_shift: float | None = None, terminal: float | None = 0.02,
    base_shift: float = 0.5, max_shift: float = 0.9,
) -> torch.Tensor:
    """Qwen-Image's schedule: linspace(1, 1/N, N), then the dynamic exponential shift with mu from the
    image token count (or the SD3 shift `flow_shift` when given), stretched to end at `terminal`
    (0 / None: no stretch, as diffusers treats a falsy shift_terminal), then 0 appended."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    sigmas = np.linspace(1.0, 1 / steps, steps).astype(np.float32)
    if flow_shift is None:
        sigmas = exponential_shift(sigmas, dynamic_mu(image_tokens, base_shift=base_shift, max_shift=max_shift))
    else:
        sigmas = sd3_shift(sigmas, flow_shift)
    if terminal:
        sigmas = stretch_to_terminal(sigmas, terminal)
    out = torch.from_numpy(np.asarray(sigmas, dtype=np.float32))
    return torch.cat([out, torch.zeros(1)])
