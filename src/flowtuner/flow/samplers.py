"""Samplers: small pure functions over a model callable `model(x, sigma) -> v` and a sigma vector.

The state is kept in float32 whatever the model's dtype, so rounding does not accumulate over steps.
Update rules follow k-diffusion / ComfyUI (../shared/reference/guidance-and-sampling.md §4.4), written
for the flow convention: the denoised estimate is D = x - sigma v, and d = (x - D) / sigma = v.

The same d = (x - D) / sigma is Karras' ODE direction for variance-exploding models (x = x0 + sigma eps,
the space ComfyUI samples discrete eps / v models in), so the deterministic samplers serve both. The
ones that add noise need to know how a clean sample is scaled at a sigma: `noising` (FLOW: 1 - sigma,
VE: 1), as ComfyUI picks its RF branches for CONST models.

Every sampler takes the same keywords: `callback`, `generator` (the noise of the stochastic ones), `noising`
and `sampling`, the active model sampling (a `SigmaTable`). Of these samplers only `dpmpp_2m_sde` reads
`sampling`, as in ComfyUI, where the half-logSNR samplers (dpmpp_sde, dpmpp_2m_sde, dpmpp_3m_sde, er_sde,
seeds, sa_solver) start a flow schedule at `percent_to_sigma(1e-4)` instead of sigma 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from flowtuner.flow.model_sampling import SigmaTable, aura_flow
from flowtuner.flow.registry import registrar

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class Noising:
    """x_sigma = alpha(sigma) x0 + sigma eps."""

    name: str
    alpha: Callable[[float], float]

    def half_log_snr(self, sigma: float) -> float:
        return math.log(self.alpha(sigma) / sigma)


FLOW = Noising("flow", lambda s: 1.0 - s)
VE = Noising("ve", lambda s: 1.0)
# a library call without a model sampling: the unshifted flow map t -> t (percent_to_sigma(1e-4) = 1 - 1e-4)
UNSHIFTED = aura_flow(1.0)
SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {}
register = registrar(SAMPLERS)


def _denoised(model: Model, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return x - sigma * model(x, sigma).to(torch.float32)


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)


@register("euler")
def euler(model: Model, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None = None, generator=None,
          noising: Noising = FLOW, sampling: SigmaTable = UNSHIFTED) -> torch.Tensor:
    """x <- x + (sigma' - sigma) d. First order, one call per step; the reference pipeline's sampler."""
    x = x.to(torch.float32)
    for i in range(len(sigmas) - 1):
        v = model(x, sigmas[i]).to(torch.float32)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
        if callback is not None:
            callback(i, x, sigmas[i])
    return x


@register("heun")
def heun(model: Model, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None = None, generator=None,
         noising: Noising = FLOW, sampling: SigmaTable = UNSHIFTED) -> torch.Tensor:
    """x <- x + (sigma' - sigma) (d + d(x_euler, sigma')) / 2. Second order, two calls per step.

    The step to sigma 0 is plain Euler."""
    x = x.to(torch.float32)
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = model(x, s).to(torch.float32)
        x_euler = x + (s_next - s) * d
        if s_next == 0:
            x = x_euler
        else:
            d_next = model(x_euler, s_next).to(torch.float32)
            x = x + (s_next - s) * (d + d_next) / 2
        if callback is not None:
            callback(i, x, s)
    return x


@register("dpmpp_2m")
def dpmpp_2m(model: Model, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None = None, generator=None,
             noising: Noising = FLOW, sampling: SigmaTable = UNSHIFTED) -> torch.Tensor:
    """x <- (s'/s) x - expm1(-h) D', D' = (1 + 1/2r) D - D_prev/2r, h in -log sigma. Second order, one call.

    DPM-Solver++(2M) with lambda = -log sigma, as ComfyUI (not flow-specific)."""
    x = x.to(torch.float32)
    old = None
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = _denoised(model, x, sigmas[i])
        if s_next == 0:
            x = d
        else:
            h = math.log(s) - math.log(s_next)
            if old is None:
                x = (s_next / s) * x - math.expm1(-h) * d
            else:
                r = (math.log(float(sigmas[i - 1])) - math.log(s)) / h if sigmas[i - 1] > 0 else 1.0
                x = (s_next / s) * x - math.expm1(-h) * ((1 + 1 / (2 * r)) * d - (1 / (2 * r)) * old)
        old = d
        if callback is not None:
            callback(i, x, sigmas[i])
    return x


def _offset_first_sigma(sigmas: torch.Tensor, noising: Noising, sampling: SigmaTable, percent: float = 1e-4) -> torch.Tensor:
    """A flow schedule starting at sigma 1 has half-logSNR -inf there; start a hair below, where ComfyUI
    does: the model sampling's sigma at time 1 - 1e-4, which depends on the shift (0.99996774 at AuraFlow
    3.1, 0.99996833 at Flux mu 1.15). With 1 - 1e-4 instead the first step's h, and through h / h_last
    the second step's correction, differ: results move far beyond float rounding (tests/test_comfyui_parity.py)."""
    if noising is FLOW and len(sigmas) > 1 and sigmas[0] >= 1:
        sigmas = sigmas.clone()
        sigmas[0] = sampling.percent_to_sigma(percent)
    return sigmas


@register("dpmpp_2m_sde")
def dpmpp_2m_sde(model: Model, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None = None,
                 generator: torch.Generator | None = None, noising: Noising = FLOW, sampling: SigmaTable = UNSHIFTED,
                 eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    """x <- (s'/s) e^(-h) x + alpha' (1 - e^(-2h)) D' + s' sqrt(1 - e^(-2h)) eps, h in log(alpha/sigma). Stochastic.

    DPM-Solver++(2M) SDE, midpoint variant, at eta = 1 (in general: e^(-h eta), 1 - e^(-h(1 + eta)),
    sqrt(1 - e^(-2 h eta))), in the half-logSNR lambda = log(alpha / sigma).
    ComfyUI draws eps from a Brownian tree (torchsde); here it is a fresh N(0, 1) per step from `generator`,
    the same distribution (tree increments over disjoint intervals are independent), other values."""
    x = x.to(torch.float32)
    sigmas = _offset_first_sigma(sigmas, noising, sampling)
    old, h_last = None, None
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = _denoised(model, x, sigmas[i])
        h = None
        if s_next == 0:
            x = d
        else:
            h = noising.half_log_snr(s_next) - noising.half_log_snr(s)
            h_eta = h * (eta + 1)
            alpha_next = noising.alpha(s_next)
            x = (s_next / s) * math.exp(-h * eta) * x - alpha_next * math.expm1(-h_eta) * d
            if old is not None:
                x = x - 0.5 * alpha_next * math.expm1(-h_eta) * (h / h_last) * (d - old)
            if eta > 0 and s_noise > 0:
                x = x + _noise_like(x, generator) * s_next * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise
        old, h_last = d, h
        if callback is not None:
            callback(i, x, sigmas[i])
    return x


def _phi1(z: float) -> float:
    return math.expm1(z) / z


def _phi2(z: float) -> float:
    return (_phi1(z) - 1) / z


@register("res_multistep")
def res_multistep(model: Model, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None = None, generator=None,
                  noising: Noising = FLOW, sampling: SigmaTable = UNSHIFTED) -> torch.Tensor:
    """x <- e^(-h) x + h (b1 D + b2 D_prev), phi-function weights, h in -log sigma (RES). Second order, one call.

    Euler on the first step and on the step to 0."""
    x = x.to(torch.float32)
    old, old_sigma = None, None
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = _denoised(model, x, sigmas[i])
        if old is None or s_next == 0:
            x = x + (s_next - s) * (x - d) / s
        else:
            h = math.log(s) - math.log(s_next)
            c2 = (math.log(s) - math.log(old_sigma)) / h
            b2 = _phi2(-h) / c2
            b1 = _phi1(-h) - b2
            x = math.exp(-h) * x + h * (b1 * d + (0.0 if math.isnan(b2) else b2) * old)
        old, old_sigma = d, s
        if callback is not None:
            callback(i, x, sigmas[i])
    return x


@register("euler_ancestral")
def euler_ancestral(model: Model, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None = None,
                    generator: torch.Generator | None = None, noising: Noising = FLOW, sampling: SigmaTable = UNSHIFTED,
                    eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    """Step down to sigma_down, add fresh noise back up to sigma'. Stochastic: fresh detail each step; images change with the step count.

    Flow models use ComfyUI's RF variant (sigma_down = s'^2 / s at eta 1, rescaled by alpha' / alpha_down)."""
    x = x.to(torch.float32)
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = _denoised(model, x, sigmas[i])
        if s_next == 0:
            x = d
        elif noising is FLOW:
            down = s_next * (1 + (s_next / s - 1) * eta)
            alpha_next, alpha_down = 1 - s_next, 1 - down
            x = (down / s) * x + (1 - down / s) * d
            if eta > 0:
                c_noise = math.sqrt(max(0.0, s_next**2 - down**2 * alpha_next**2 / alpha_down**2))
                x = (alpha_next / alpha_down) * x + _noise_like(x, generator) * s_noise * c_noise
        else:
            up = min(s_next, eta * math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2))
            down = math.sqrt(s_next**2 - up**2)
            x = x + (x - d) / s * (down - s) + _noise_like(x, generator) * s_noise * up
        if callback is not None:
            callback(i, x, sigmas[i])
    return x


@register("lcm")
def lcm(model: Model, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None = None,
        generator: torch.Generator | None = None, noising: Noising = FLOW, sampling: SigmaTable = UNSHIFTED) -> torch.Tensor:
    """x <- alpha' D + s' eps: jump to D, re-noise to the next sigma. For LCM / few-step distilled models."""
    x = x.to(torch.float32)
    for i in range(len(sigmas) - 1):
        x = _denoised(model, x, sigmas[i])
        s_next = float(sigmas[i + 1])
        if s_next > 0:
            x = noising.alpha(s_next) * x + s_next * _noise_like(x, generator)
        if callback is not None:
            callback(i, x, sigmas[i])
    return x
