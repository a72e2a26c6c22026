"""Discrete-time (VP) model sampling, as ComfyUI's ModelSamplingDiscrete: the sigma table of a 1000-step
DDPM beta schedule, the sigma <-> timestep maps, and the prediction types that turn a network output into
the denoised estimate D. SDXL-type models (eps / v_prediction) sample through this; flow models do not.

ComfyUI samples these models in the variance-exploding space x = x0 + sigma eps; the network sees
c_in x = x / sqrt(sigma^2 + 1), the VP sample. `as_sampler_model` wraps a network `net(x_in, t)` into the
`model(x, sigma) -> (x - D) / sigma` the samplers take (with `noising=VE`).
Formulas: ../shared/reference/guidance-and-sampling.md §1.1, §1.2, §2.1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from flowtuner.flow.model_sampling import SigmaTable

# ComfyUI's last alpha-bar after the zero-terminal-SNR rescale (exactly zero would make sigma infinite)
ZSNR_LAST_ALPHA_BAR = 4.8973451890853435e-08


def linear_betas(steps: int = 1000, start: float = 0.00085, end: float = 0.012) -> torch.Tensor:
    """SD's "linear" schedule: linear in sqrt(beta)."""
    return torch.linspace(math.sqrt(start), math.sqrt(end), steps, dtype=torch.float64) ** 2


def sigmas_from_betas(betas: torch.Tensor) -> torch.Tensor:
    alpha_bar = torch.cumprod(1 - betas, dim=0)
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def zero_terminal_snr(sigmas: torch.Tensor) -> torch.Tensor:
    """Rescale sqrt(alpha-bar) so the last step is (almost) pure noise, keeping the first (Lin et al.)."""
    a = (1 / (sigmas.double() ** 2 + 1)).sqrt()
    a0, a_last = a[0].clone(), a[-1].clone()
    a = (a - a_last) * a0 / (a0 - a_last)
    alpha_bar = a**2
    alpha_bar[-1] = ZSNR_LAST_ALPHA_BAR
    return ((1 - alpha_bar) / alpha_bar).sqrt()


@dataclass(frozen=True)
class DiscreteSampling(SigmaTable):
    """An ascending sigma table; timesteps are its indices (times `stride`, plus `offset`, for distilled
    tables). Same interface as `FlowSampling`, so the ComfyUI schedulers run on it."""

    name: str
    table: torch.Tensor  # float32, ascending
    stride: int = 1
    offset: int = 0

    @property
    def length(self) -> int:
        return len(self.table)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Index of the nearest table sigma in log space (a float tensor of integers)."""
        log_sigma = torch.as_tensor(sigma, dtype=torch.float32).log()
        dist = (log_sigma.reshape(-1, 1) - self.table.log().reshape(1, -1)).abs()
        index = dist.argmin(dim=1).reshape(log_sigma.shape).to(torch.float32)
        return index * self.stride + self.offset

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """exp of the linear interpolation of log sigma at fractional timestep t."""
        t = ((torch.as_tensor(t, dtype=torch.float64) - self.offset) / self.stride).clamp(0, self.length - 1)
        low = t.floor().long()
        high = t.ceil().long()
        w = t - low
        log_table = self.table.double().log()
        return ((1 - w) * log_table[low] + w * log_table[high]).exp().to(torch.float32)

    def flow_sigmas(self, sigmas: torch.Tensor) -> torch.Tensor:
        """VE sigma s -> flow sigma s / (1 + s): x_VE = x0 + s eps is (1 + s) times the flow state at that sigma."""
        return (sigmas.double() / (1 + sigmas.double())).to(torch.float32)

    def flow_noise_scale(self, sigma: float) -> float:
        """ComfyUI's (and diffusers') start sqrt(1 + s^2) eps on the VE path, i.e. at unit VP variance, moved to the
        flow path: sqrt(1 + s^2) / (1 + s) = sqrt((1 - sigma)^2 + sigma^2)."""
        return math.sqrt((1 - sigma) ** 2 + sigma**2)

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0:
            return 999999999.9
        if percent >= 1:
            return 0.0
        return float(self.sigma(torch.tensor((1 - percent) * ((self.length - 1) * self.stride + self.offset))))


def discrete(zsnr: bool = False, steps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012) -> DiscreteSampling:
    sigmas = sigmas_from_betas(linear_betas(steps, linear_start, linear_end))
    if zsnr:
        sigmas = zero_terminal_snr(sigmas)
    return DiscreteSampling("discrete" + ("+zsnr" if zsnr else ""), sigmas.to(torch.float32))


def lcm_distilled(base: DiscreteSampling, original_steps: int = 50) -> DiscreteSampling:
    """LCM's 50-step table: every (1000 / 50)-th sigma counted from the top; timestep = 20 k + 19."""
    stride = base.length // original_steps
    keep = torch.arange(base.length - 1, -1, -stride)[:original_steps].flip(0)
    return DiscreteSampling(base.name + "+lcm", base.table[keep], stride=stride, offset=stride - 1)


@dataclass(frozen=True)
class Prediction:
    """What the network predicts: c_in (the input scale) and D from the output."""

    name: str
    c_in: Callable[[float], float]
    denoised: Callable[[DiscreteSampling, float, torch.Tensor, torch.Tensor], torch.Tensor]


def _vp_in(sigma: float) -> float:
    return 1 / math.sqrt(sigma**2 + 1)


def _lcm_denoised(ms: DiscreteSampling, sigma: float, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    t = 10 * float(ms.timestep(torch.tensor(sigma)))
    c_skip = 0.25 / (t**2 + 0.25)  # sigma_data 0.5 inside the LCM boundary condition
    c_out = t / math.sqrt(t**2 + 0.25)
    return c_out * (x - out * sigma) + c_skip * x


PREDICTIONS: dict[str, Prediction] = {
    "eps": Prediction("eps", _vp_in, lambda ms, s, out, x: x - out * s),
    "v_prediction": Prediction("v_prediction", _vp_in, lambda ms, s, out, x: x / (s**2 + 1) - out * s / math.sqrt(s**2 + 1)),
    "x0": Prediction("x0", _vp_in, lambda ms, s, out, x: out),
    "lcm": Prediction("lcm", _vp_in, _lcm_denoised),
}


def noise_scaling(sigma: float, noise: torch.Tensor, latent: torch.Tensor, max_denoise: bool) -> torch.Tensor:
    """The sampler's starting point: latent + sigma noise; from the top of the table (max_denoise) the
    noise is scaled by sqrt(1 + sigma^2) so the VP input has unit variance."""
    return latent + noise * (math.sqrt(1 + sigma**2) if max_denoise else sigma)


def as_sampler_model(net: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ms: DiscreteSampling,
                     prediction: Prediction) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """net(c_in x, timestep) -> the samplers' model(x, sigma) = (x - D) / sigma."""

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = float(sigma)
        out = net(x * prediction.c_in(s), ms.timestep(torch.tensor(s))).to(torch.float32)
        return (x - prediction.denoised(ms, s, out, x)) / s

    return model
