"""Training timestep samplers: small registered functions drawing sigma in (0, 1) per sample.

Each sampler declares the options it reads; an option given on the command line that the chosen
sampler does not read is an error (musubi-tuner's default mode silently ignores
--discrete_flow_shift). The DiT later receives exactly the sigma used to mix the noise (musubi-tuner
conditions on sigma + 0.001 in most modes).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from flowtuner.errors import ConfigError
from flowtuner.flow.schedules import dynamic_mu


@dataclass
class TimestepOptions:
    sigmoid_scale: float | None = None
    discrete_flow_shift: float | None = None
    logit_mean: float | None = None
    logit_std: float | None = None
    min_timestep: float | None = None  # 0..1000, musubi-tuner's scale
    max_timestep: float | None = None
    preserve_distribution_shape: bool = False

    def get(self, name: str, default: float) -> float:
        value = getattr(self, name)
        return default if value is None else value


Sampler = Callable[[int, torch.Generator, TimestepOptions, int], torch.Tensor]
SAMPLERS: dict[str, tuple[Sampler, tuple[str, ...]]] = {}


def register(name: str, *uses: str):
    def deco(fn: Sampler) -> Sampler:
        SAMPLERS[name] = (fn, uses)
        return fn
    return deco


def _normal(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(n, generator=gen)


def shift_sigma(t: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * t / (1 + (shift - 1) * t)


def _lin(x1: float, y1: float, x2: float, y2: float, x: float) -> float:
    return (y2 - y1) / (x2 - x1) * (x - x1) + y1


@register("uniform")
def uniform(n, gen, opt, tokens):
    return torch.rand(n, generator=gen)


@register("sigmoid", "sigmoid_scale")
def sigmoid(n, gen, opt, tokens):
    return torch.sigmoid(opt.get("sigmoid_scale", 1.0) * _normal(n, gen))


@register("shift", "sigmoid_scale", "discrete_flow_shift")
def shift(n, gen, opt, tokens):
    return shift_sigma(sigmoid(n, gen, opt, tokens), opt.get("discrete_flow_shift", 1.0))


@register("flux_shift", "sigmoid_scale")
def flux_shift(n, gen, opt, tokens):
    return shift_sigma(sigmoid(n, gen, opt, tokens), math.exp(_lin(256, 0.5, 4096, 1.15, tokens)))


@register("qwen_shift", "sigmoid_scale")
def qwen_shift(n, gen, opt, tokens):
    """The inference schedule's resolution-dependent shift (without its terminal stretch)."""
    return shift_sigma(sigmoid(n, gen, opt, tokens), math.exp(dynamic_mu(tokens)))


@register("logsnr", "logit_mean", "logit_std")
def logsnr(n, gen, opt, tokens):
    snr = opt.get("logit_mean", 0.0) + opt.get("logit_std", 1.0) * _normal(n, gen)
    return torch.sigmoid(-snr / 2)


@register("qinglong_qwen", "sigmoid_scale")
def qinglong_qwen(n, gen, opt, tokens):
    """Per sample: 95 % qwen_shift, 5 % logSNR ~ N(5.36, 1) (low sigma: fine detail)."""
    base = qwen_shift(n, gen, opt, tokens)
    high = torch.sigmoid(-(5.36 + _normal(n, gen)) / 2)
    return torch.where(torch.rand(n, generator=gen) < 0.05, high, base)


@register("logit_normal", "logit_mean", "logit_std")
def logit_normal(n, gen, opt, tokens):
    """sigmoid(N(mean, std)); bigASP's shifted logit-normal is mean = ln(shift)."""
    return torch.sigmoid(opt.get("logit_mean", 0.0) + opt.get("logit_std", 1.0) * _normal(n, gen))


def check_options(name: str, opt: TimestepOptions) -> None:
    if name not in SAMPLERS:
        raise ConfigError(f"--timestep_sampling {name}: unknown; choose one of {', '.join(SAMPLERS)}.")
    uses = SAMPLERS[name][1]
    for field in ("sigmoid_scale", "discrete_flow_shift", "logit_mean", "logit_std"):
        if getattr(opt, field) is not None and field not in uses:
            users = [k for k, (_, u) in SAMPLERS.items() if field in u]
            raise ConfigError(f"--{field} has no effect with --timestep_sampling {name}; it is read by: {', '.join(users)}.")
    lo, hi = opt.get("min_timestep", 0.0), opt.get("max_timestep", 1000.0)
    if not 0 <= lo < hi <= 1000:
        raise ConfigError(f"--min_timestep {lo} / --max_timestep {hi}: need 0 <= min < max <= 1000.")


def sample_sigmas(name: str, n: int, gen: torch.Generator, opt: TimestepOptions, image_tokens: int) -> torch.Tensor:
    """n sigmas in (0, 1), restricted to [min_timestep, max_timestep] / 1000: rescaled into the range,
    or with `preserve_distribution_shape`, redrawn until inside it."""
    fn = SAMPLERS[name][0]
    lo, hi = opt.get("min_timestep", 0.0) / 1000, opt.get("max_timestep", 1000.0) / 1000
    if (lo, hi) == (0.0, 1.0):
        return fn(n, gen, opt, image_tokens)
    if not opt.preserve_distribution_shape:
        return fn(n, gen, opt, image_tokens) * (hi - lo) + lo
    out = fn(n, gen, opt, image_tokens)
    for _ in range(1000):
        bad = (out < lo) | (out > hi)
        if not bad.any():
            return out
        out[bad] = fn(int(bad.sum()), gen, opt, image_tokens)
    raise ConfigError(f"--preserve_distribution_shape: the sampler almost never draws inside [{lo}, {hi}].")
