"""Samplers: small pure functions over a model callable `model(x, sigma) -> v` and a sigma vector.

The state is kept in float32 whatever the model's dtype, so rounding does not accumulate over steps.
Update rules follow k-diffusion / ComfyUI (../shared/reference/guidance-and-sampling.md §4.4), written
for the flow convention: the denoised estimate is D = x - sigma v, and d = (x - D) / sigma = v.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, torch.Tensor, torch.Tensor], None]


def _denoised(model: Model, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return x - sigma * model(x, sigma).to(torch.float32)


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)


def euler(model: Model, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None = None, generator=None) -> torch.Tensor:
    """First-order flow-matching Euler: x <- x + (sigma_next - sigma) v."""
    x = x.to(torch.float32)
    for i in range(len(sigmas) - 1):
        v = model(x, sigmas[i]).to(torch.float32)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
        if callback is not None:
            callback(i, x, sigmas[i])
    return x


def heun(model: Model, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None = None, generator=None) -> torch.Tensor:
    """Second order (trapezoidal); the last step to sigma 0 is Euler."""
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


def dpmpp_2m(model: Model, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None = None, generator=None) -> torch.Tensor:
    """DPM-Solver++(2M) with lambda = -log sigma (as ComfyUI, not flow-specific)."""
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


def _phi1(z: float) -> float:
    return math.expm1(z) / z


def _phi2(z: float) -> float:
    return (_phi1(z) - 1) / z


def res_multistep(model: Model, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None = None, generator=None) -> torch.Tensor:
    """RES 2-step multistep (eta = 0): Euler on the first step and the step to 0."""
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


def euler_ancestral(model: Model, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None = None,
                    generator: torch.Generator | None = None, eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    """Ancestral Euler for flow models (ComfyUI's RF variant): step to sigma_down, then re-noise to sigma_next."""
    x = x.to(torch.float32)
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = _denoised(model, x, sigmas[i])
        if s_next == 0:
            x = d
        else:
            down = s_next * (1 + (s_next / s - 1) * eta)
            alpha_next, alpha_down = 1 - s_next, 1 - down
            x = (down / s) * x + (1 - down / s) * d
            if eta > 0:
                c_noise = math.sqrt(max(0.0, s_next**2 - down**2 * alpha_next**2 / alpha_down**2))
                x = (alpha_next / alpha_down) * x + _noise_like(x, generator) * s_noise * c_noise
        if callback is not None:
            callback(i, x, sigmas[i])
    return x


def lcm(model: Model, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None = None,
        generator: torch.Generator | None = None) -> torch.Tensor:
    """LCM: jump to the denoised estimate, then re-noise it to the next sigma."""
    x = x.to(torch.float32)
    for i in range(len(sigmas) - 1):
        x = _denoised(model, x, sigmas[i])
        s_next = float(sigmas[i + 1])
        if s_next > 0:
            x = s_next * _noise_like(x, generator) + (1 - s_next) * x
        if callback is not None:
            callback(i, x, sigmas[i])
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": euler, "euler_ancestral": euler_ancestral, "heun": heun, "dpmpp_2m": dpmpp_2m,
    "res_multistep": res_multistep, "lcm": lcm,
}
