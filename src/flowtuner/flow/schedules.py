"""Sigma schedules as pure functions. Each returns `steps + 1` float32 sigmas ending in 0.

The reference (diffusers FlowMatchEulerDiscreteScheduler) computes in float32 numpy; these functions do the
same so schedules match it bit for bit. Model constants (the shift line, the terminal) come from the family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def dynamic_mu(image_tokens: float, base_len: float, max_len: float, base_shift: float, max_shift: float) -> float:
    """Resolution-dependent shift exponent: a line through (base_len, base_shift), (max_len, max_shift).
    The one copy of this line: diffusers' calculate_shift, musubi-tuner's get_lin_function and ComfyUI's
    ModelSamplingFlux all compute it as m x + (y1 - m x1), so the same float arithmetic serves all three."""
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_tokens * m + (base_shift - m * base_len)


@dataclass(frozen=True)
class ShiftLine:
    """A model's resolution-dependent shift: mu on the line through (base_len, base_shift), (max_len, max_shift)
    over its image token count. The family gives its own (its scheduler config); --base_shift / --max_shift
    replace the ends."""

    base_len: float
    max_len: float
    base_shift: float
    max_shift: float

    def mu(self, image_tokens: float) -> float:
        return dynamic_mu(image_tokens, self.base_len, self.max_len, self.base_shift, self.max_shift)


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
    steps: int, image_tokens: int, line: ShiftLine, flow_shift: float | None = None, terminal: float | None = 0.02,
) -> torch.Tensor:
    """The flow-match schedule of diffusers' FlowMatchEulerDiscreteScheduler with dynamic shifting:
    linspace(1, 1/N, N), then the exponential shift with mu from the image token count on `line` (or the SD3
    shift `flow_shift` when given), stretched to end at `terminal` (0 / None: no stretch, as diffusers treats a
    falsy shift_terminal), then 0 appended."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    sigmas = np.linspace(1.0, 1 / steps, steps).astype(np.float32)
    if flow_shift is None:
        sigmas = exponential_shift(sigmas, line.mu(image_tokens))
    else:
        sigmas = sd3_shift(sigmas, flow_shift)
    if terminal:
        sigmas = stretch_to_terminal(sigmas, terminal)
    out = torch.from_numpy(np.asarray(sigmas, dtype=np.float32))
    return torch.cat([out, torch.zeros(1)])
