"""Loss weightings as functions of sigma (registered by name).

`sigma_sqrt` and `cosmap` are SD3's loss weights. `logit_normal` and `mode` are SD3's *sampling*
densities; as loss weights they are that density at sigma, which has the same expected gradient as
drawing sigma from it (importance weighting). flowtuner therefore never ignores a weighting flag.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from flowtuner.flow.registry import registrar

Weighting = Callable[[torch.Tensor, dict], torch.Tensor]
WEIGHTINGS: dict[str, Weighting] = {}
register = registrar(WEIGHTINGS)


@register("none")
def none(sigma, opt):
    return torch.ones_like(sigma)


@register("sigma_sqrt")
def sigma_sqrt(sigma, opt):
    return sigma.clamp_min(1e-4) ** -2.0


@register("cosmap")
def cosmap(sigma, opt):
    return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))


@register("logit_normal")
def logit_normal(sigma, opt):
    m, s = opt.get("logit_mean", 0.0), opt.get("logit_std", 1.0)
    t = sigma.clamp(1e-5, 1 - 1e-5)
    logit = torch.log(t / (1 - t))
    return torch.exp(-((logit - m) ** 2) / (2 * s * s)) / (s * math.sqrt(2 * math.pi) * t * (1 - t))


def _mode_map(u: torch.Tensor, scale: float) -> torch.Tensor:
    return 1 - u - scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)


@register("mode")
def mode(sigma, opt):
    """Density of SD3's mode sampler t = 1 - u - s (cos^2(pi u / 2) - 1 + u) at sigma (bisection for u)."""
    scale = opt.get("mode_scale", 1.29)
    lo, hi = torch.zeros_like(sigma), torch.ones_like(sigma)
    for _ in range(40):  # t(u) decreases from 1 to 0
        mid = (lo + hi) / 2
        above = _mode_map(mid, scale) > sigma
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    u = (lo + hi) / 2
    slope = -1 - scale * (1 - (math.pi / 2) * torch.sin(math.pi * u))
    return 1 / slope.abs()
