"""How a flow model maps timesteps to sigmas, as ComfyUI's model-sampling objects do (their sigma
tables drive ComfyUI's schedulers, so a scheduler's output depends on them).

- `aura_flow(shift)`: ComfyUI's ModelSamplingAuraFlow / SD3 style, sigma(t) = shift t / (1 + (shift - 1) t),
  a 1000-entry table at t = (k + 1) / 1000.
- `flux(mu)`: ComfyUI's ModelSamplingFlux, sigma(t) = e^mu / (e^mu + 1/t - 1) (the same shift with
  shift = e^mu), a 10000-entry table. Qwen-Image's default in ComfyUI is mu = 1.15.
The network input for these is sigma itself (multiplier 1): Qwen-Image scales by 1000 inside.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch

from flowtuner.flow.schedules import dynamic_mu, sd3_shift


def time_snr_shift(shift: float, t: torch.Tensor) -> torch.Tensor:
    if shift == 1.0:
        return t
    return sd3_shift(t, shift)


class SigmaTable:
    """What ComfyUI's schedulers and samplers read from a model sampling: an ascending float32 `table`, its
    ends, and `percent_to_sigma` (the SDE samplers' first sigma on flow models comes from it)."""

    table: torch.Tensor

    def percent_to_sigma(self, percent: float) -> float:
        raise NotImplementedError

    def flow_sigmas(self, sigmas: torch.Tensor) -> torch.Tensor:
        """This table's sigmas as sigmas of the flow path x = (1 - s) x0 + s eps that flowtuner samples on."""
        return sigmas

    def flow_noise_scale(self, sigma: float) -> float:
        """The scale of the noise a text-to-image run starts from at flow sigma `sigma` (the first of the schedule)."""
        return 1.0

    @property
    def sigma_min(self) -> float:
        return float(self.table[0])

    @property
    def sigma_max(self) -> float:
        return float(self.table[-1])


@dataclass(frozen=True)
class FlowSampling(SigmaTable):
    name: str
    sigma_fn: Callable[[torch.Tensor], torch.Tensor]  # t in [0, 1] -> sigma
    length: int

    @cached_property
    def table(self) -> torch.Tensor:
        """Ascending sigma table S[k] = sigma((k + 1) / length), float32."""
        t = torch.arange(1, self.length + 1, dtype=torch.float64) / self.length
        return self.sigma_fn(t).to(torch.float32)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_fn(t)

    def percent_to_sigma(self, percent: float) -> float:
        """sigma at time 1 - percent, in float64 as ComfyUI's Python arithmetic: 1 at 0 %, 0 at 100 %."""
        if percent <= 0:
            return 1.0
        if percent >= 1:
            return 0.0
        return float(self.sigma_fn(torch.tensor(1 - percent, dtype=torch.float64)))


def aura_flow(shift: float) -> FlowSampling:
    return FlowSampling(f"auraflow(shift={shift})", lambda t: time_snr_shift(shift, t), 1000)


def flux(mu: float) -> FlowSampling:
    return FlowSampling(f"flux(mu={mu})", lambda t: time_snr_shift(math.exp(mu), t), 10000)


def flux_mu(height: int, width: int, base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """ComfyUI's ModelSamplingFlux: mu linear in the number of 16x16-pixel tokens, base_shift at 256
    tokens, max_shift at 4096."""
    return dynamic_mu(width * height / (8 * 8 * 2 * 2), 256, 4096, base_shift, max_shift)
