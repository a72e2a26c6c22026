"""Training timestep samplers: small registered functions drawing sigma in (0, 1) per sample.

Every `--timestep_sampling` name of musubi-tuner is here, drawing its random numbers in musubi-tuner's
order (`training/trainer_base.py::get_noisy_model_input_and_timesteps`), so one seed gives the same sigmas.
Each sampler declares the options it reads; an option given on the command line that the chosen sampler
does not read is reported in one warning line and ignored (musubi-tuner ignores it silently). The DiT
later receives exactly the sigma used to mix the noise (musubi-tuner conditions on sigma + 0.001 in most
modes; in `sigma` mode it too feeds the sigma itself).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from flowtuner.errors import ConfigError
from flowtuner.flow.schedules import ShiftLine, dynamic_mu
from flowtuner.flow.schedules import sd3_shift as shift_sigma
from flowtuner.flow.weighting import _mode_map

log = logging.getLogger(__name__)

#: weighting schemes that are sampling densities; the `sigma` sampler draws from them instead of weighting the loss
DENSITY_SCHEMES = ("logit_normal", "mode")
#: musubi-tuner's training scheduler table (FlowMatchDiscreteScheduler, 1000 steps, no shift): sigma_i = 1 - i / 1000
_TABLE = torch.linspace(1.0, 0.0, 1001)


@dataclass
class TimestepOptions:
    sigmoid_scale: float | None = None
    discrete_flow_shift: float | None = None
    logit_mean: float | None = None
    logit_std: float | None = None
    min_timestep: float | None = None  # 0..1000, musubi-tuner's scale
    max_timestep: float | None = None
    preserve_distribution_shape: bool = False
    weighting_scheme: str = "none"
    mode_scale: float = 1.29
    #: the model's own resolution-dependent shift (the family's; set by the trainer, not a flag)
    shift_line: ShiftLine | None = None

    def get(self, name: str, default: float) -> float:
        value = getattr(self, name)
        return default if value is None else value


@dataclass(frozen=True)
class Sampler:
    fn: Callable[[int, torch.Generator, TimestepOptions, int], torch.Tensor]
    uses: tuple[str, ...]
    own_range: bool = False  # applies --min/--max_timestep itself (the `sigma` table indices)
    density: bool = False  # draws from --weighting_scheme's density, which then weights no loss


SAMPLERS: dict[str, Sampler] = {}


def register(name: str, *uses: str, own_range: bool = False, density: bool = False):
    def deco(fn):
        SAMPLERS[name] = Sampler(fn, uses, own_range, density)
        return fn
    return deco


def _normal(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(n, generator=gen)


def _flux_mu(tokens: float, max_len: float = 4096) -> float:
    """musubi-tuner's get_lin_function(y1=0.5, y2=1.15) (x2 = max_len): Flux's mu line."""
    return dynamic_mu(tokens, 256, max_len, 0.5, 1.15)


def _shifted(n, gen, opt, mu: float) -> torch.Tensor:
    return shift_sigma(sigmoid(n, gen, opt, 0), math.exp(mu))


def _logsnr(n, gen, mean: float, std: float) -> torch.Tensor:
    return torch.sigmoid(-(mean + std * _normal(n, gen)) / 2)


# `tokens` is the packed sequence length (h/2)(w/2) of h x w latents, as musubi-tuner computes it
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
    return _shifted(n, gen, opt, _flux_mu(tokens))


@register("flux2_shift", "sigmoid_scale")
def flux2_shift(n, gen, opt, tokens):
    """Flux.2's line over the unpacked latent area h w = 4 tokens (musubi-tuner's formula)."""
    return _shifted(n, gen, opt, _flux_mu(4 * tokens))


@register("krea2_shift", "sigmoid_scale")
def krea2_shift(n, gen, opt, tokens):
    return _shifted(n, gen, opt, _flux_mu(tokens, max_len=6400))


def _model_mu(opt: TimestepOptions, tokens: float) -> float:
    if opt.shift_line is None:
        raise ConfigError("this --timestep_sampling follows the model's own shift, and no model family gave one.")
    return opt.shift_line.mu(tokens)


@register("qwen_shift", "sigmoid_scale")
def qwen_shift(n, gen, opt, tokens):
    """The model's inference schedule's resolution-dependent shift (without its terminal stretch); musubi-tuner's
    name, after the model it was written for."""
    return _shifted(n, gen, opt, _model_mu(opt, tokens))


@register("ideogram4_shift")
def ideogram4_shift(n, gen, opt, tokens):
    """Ideogram 4's logit-normal sigmoid(m + 1.5 z), m = ln(pixels / 512^2) / 2 with pixels = 16^2 h w as
    musubi-tuner computes it from the latent grid, clamped to its logSNR range [-15, 18]."""
    u = torch.rand(n, generator=gen).double().clamp(1e-7, 1 - 1e-7)
    mean = 0.5 * math.log(4 * tokens * 256 / (512 * 512))
    t = torch.special.expit(mean + 1.5 * torch.special.ndtri(u))
    return t.clamp(1 - 1 / (1 + math.exp(-7.5)), 1 - 1 / (1 + math.exp(9.0))).float()


@register("logsnr", "logit_mean", "logit_std")
def logsnr(n, gen, opt, tokens):
    return _logsnr(n, gen, opt.get("logit_mean", 0.0), opt.get("logit_std", 1.0))


def _qinglong(n, gen, opt, mu: float, mid: float, logsnr_end: float) -> torch.Tensor:
    """Per sample: decision u < mid -> the shifted sigmoid, u < logsnr_end -> logsnr(mean, std), else logSNR ~
    N(5.36, 1) (low sigma: fine detail). Draw order as musubi-tuner: decisions, then each group's draws."""
    decision = torch.rand(n, generator=gen)
    groups = ((decision < mid, lambda k: _shifted(k, gen, opt, mu)),
              ((decision >= mid) & (decision < logsnr_end),
               lambda k: _logsnr(k, gen, opt.get("logit_mean", 0.0), opt.get("logit_std", 1.0))),
              (decision >= logsnr_end, lambda k: _logsnr(k, gen, 5.36, 1.0)))
    t = torch.zeros(n)
    for mask, draw in groups:
        if mask.any():
            t[mask] = draw(int(mask.sum()))
    return t


@register("qinglong_flux", "sigmoid_scale", "logit_mean", "logit_std")
def qinglong_flux(n, gen, opt, tokens):
    """Per sample: 79 % flux_shift, 11 % logsnr(--logit_mean, --logit_std), 10 % logSNR ~ N(5.36, 1)."""
    return _qinglong(n, gen, opt, _flux_mu(tokens), 0.79, 0.9)


@register("qinglong_qwen", "sigmoid_scale")
def qinglong_qwen(n, gen, opt, tokens):
    """Per sample: 95 % qwen_shift, 5 % logSNR ~ N(5.36, 1) (low sigma: fine detail)."""
    return _qinglong(n, gen, opt, _model_mu(opt, tokens), 0.95, 0.95)


@register("logit_normal", "logit_mean", "logit_std")
def logit_normal(n, gen, opt, tokens):
    """sigmoid(N(mean, std)); bigASP's shifted logit-normal is mean = ln(shift)."""
    return torch.sigmoid(opt.get("logit_mean", 0.0) + opt.get("logit_std", 1.0) * _normal(n, gen))


def _density(n, gen, opt) -> torch.Tensor:
    """u in [0, 1) from --weighting_scheme's density (SD3's compute_density_for_timestep_sampling)."""
    if opt.weighting_scheme == "logit_normal":
        return logit_normal(n, gen, opt, 0)
    u = torch.rand(n, generator=gen)
    return _mode_map(u, opt.mode_scale) if opt.weighting_scheme == "mode" else u


@register("sigma", own_range=True, density=True)
def sigma(n, gen, opt, tokens):
    """musubi-tuner's parser default: u from --weighting_scheme's density (logit_normal, mode, else uniform),
    index i = int(u (max - min) + min) into the unshifted 1000-step table, sigma = 1 - i / 1000.
    --discrete_flow_shift is not applied (musubi-tuner's training scheduler is built unshifted)."""
    lo, hi = opt.get("min_timestep", 0.0), opt.get("max_timestep", 1000.0)
    index = (_density(n, gen, opt) * (hi - lo) + lo).long()
    return _TABLE[index.clamp(0, 999)]  # u = 1 exactly (probability ~2^-24) would index past musubi-tuner's table


def options_read(name: str, weighting_scheme: str) -> set[str]:
    read = set(SAMPLERS[name].uses)
    if weighting_scheme == "logit_normal":  # a sampling density for `sigma`, a loss weight otherwise
        read |= {"logit_mean", "logit_std"}
    return read


def ignored_options(name: str, opt: TimestepOptions) -> list[str]:
    """One message per option that was given but that this sampler (and weighting) does not read."""
    read, out = options_read(name, opt.weighting_scheme), []
    for field in ("sigmoid_scale", "discrete_flow_shift", "logit_mean", "logit_std"):
        if getattr(opt, field) is not None and field not in read:
            users = [k for k, s in SAMPLERS.items() if field in s.uses]
            out.append(f"--{field} has no effect with --timestep_sampling {name} (read by: {', '.join(users)}); "
                       "ignored, as musubi-tuner does.")
    if opt.preserve_distribution_shape and SAMPLERS[name].own_range:
        out.append(f"--preserve_distribution_shape has no effect with --timestep_sampling {name}: --min/--max_timestep "
                   "index its table directly; ignored, as musubi-tuner does.")
    return out


def check_options(name: str, opt: TimestepOptions) -> None:
    """Errors for unusable values; one warning line per option the chosen sampler ignores."""
    if name not in SAMPLERS:
        raise ConfigError(f"--timestep_sampling {name}: unknown; choose one of {', '.join(SAMPLERS)}.")
    lo, hi = opt.get("min_timestep", 0.0), opt.get("max_timestep", 1000.0)
    if not 0 <= lo < hi <= 1000:
        raise ConfigError(f"--min_timestep {lo} / --max_timestep {hi}: need 0 <= min < max <= 1000.")
    for message in ignored_options(name, opt):
        log.warning(message)


def loss_weighting(name: str, scheme: str) -> str:
    """The weighting applied to the loss: a density scheme the sampler already drew from weights nothing
    (musubi-tuner's `sigma` mode); otherwise the scheme itself."""
    return "none" if SAMPLERS[name].density and scheme in DENSITY_SCHEMES else scheme


def sample_sigmas(name: str, n: int, gen: torch.Generator, opt: TimestepOptions, image_tokens: int) -> torch.Tensor:
    """n sigmas in (0, 1], restricted to [min_timestep, max_timestep] / 1000: rescaled into the range,
    or with `preserve_distribution_shape`, redrawn until inside it (samplers with their own range apply it
    themselves)."""
    sampler = SAMPLERS[name]
    fn = sampler.fn
    lo, hi = opt.get("min_timestep", 0.0) / 1000, opt.get("max_timestep", 1000.0) / 1000
    if (lo, hi) == (0.0, 1.0) or sampler.own_range:
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
