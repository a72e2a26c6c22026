"""ComfyUI's schedulers as pure functions of (model sampling, steps) -> steps + 1 sigmas ending in 0
(beta may return fewer: ComfyUI drops repeated table indices). Formulas in
../shared/reference/guidance-and-sampling.md §4.3; the tests compare against its reference vectors."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from flowtuner.flow.model_sampling import FlowSampling
from flowtuner.flow.registry import registrar

Scheduler = Callable[[FlowSampling, int], torch.Tensor]
SCHEDULERS: dict[str, Scheduler] = {}
register = registrar(SCHEDULERS)


def _append_zero(s: torch.Tensor) -> torch.Tensor:
    return torch.cat([s.to(torch.float32), torch.zeros(1)])


@register("simple")
def simple(ms: FlowSampling, steps: int) -> torch.Tensor:
    """sigma_i = S[L - 1 - int(i L / N)]: evenly spaced table entries (ComfyUI's default for flow models)."""
    table, step = ms.table, ms.length / steps
    return _append_zero(torch.stack([table[ms.length - 1 - int(i * step)] for i in range(steps)]))


def _timestep_linspace(ms: FlowSampling, n: int) -> torch.Tensor:
    return torch.linspace(float(ms.timestep(torch.tensor(ms.sigma_max))), float(ms.timestep(torch.tensor(ms.sigma_min))), n)


@register("normal")
def normal(ms: FlowSampling, steps: int) -> torch.Tensor:
    """sigma(linspace(t_max, t_min, N + 1)); on flow tables the last non-zero sigma is shifted twice."""
    end = float(ms.sigma(ms.timestep(torch.tensor(ms.sigma_min, dtype=torch.float64))))
    if math.isclose(end, 0.0, abs_tol=1e-5):
        return ms.sigma(_timestep_linspace(ms, steps + 1).double()).float()
    return _append_zero(ms.sigma(_timestep_linspace(ms, steps).double()))


@register("sgm_uniform")
def sgm_uniform(ms: FlowSampling, steps: int) -> torch.Tensor:
    """sigma(linspace(t_max, t_min, N + 1)[:-1]), then 0."""
    return _append_zero(ms.sigma(_timestep_linspace(ms, steps + 1)[:-1].double()))


@register("karras")
def karras(ms: FlowSampling, steps: int, rho: float = 7.0) -> torch.Tensor:
    """(s_max^(1/7) + r (s_min^(1/7) - s_max^(1/7)))^7: dense at low sigma (made for VE models)."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = ms.sigma_min ** (1 / rho), ms.sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


@register("exponential")
def exponential(ms: FlowSampling, steps: int) -> torch.Tensor:
    """exp(linspace(log s_max, log s_min, N)): even in log sigma."""
    return _append_zero(torch.linspace(math.log(ms.sigma_max), math.log(ms.sigma_min), steps, dtype=torch.float64).exp())


@register("kl_optimal")
def kl_optimal(ms: FlowSampling, steps: int) -> torch.Tensor:
    """tan(a atan(s_min) + (1 - a) atan(s_max)), a = i/(N - 1)."""
    if steps < 2:
        return torch.tensor([ms.sigma_max, 0.0])  # ComfyUI divides by zero here
    # float32, as ComfyUI: near pi/2 the angle's rounding shows (zsnr's sigma_max 4518.76 comes out 4518.18)
    a = torch.arange(steps, dtype=torch.float32) / (steps - 1)
    return _append_zero(torch.tan(a * math.atan(ms.sigma_min) + (1 - a) * math.atan(ms.sigma_max)))


@register("linear_quadratic")
def linear_quadratic(ms: FlowSampling, steps: int, threshold: float = 0.025) -> torch.Tensor:
    """1 - sigma linear to 0.025 over the first N/2 steps, then quadratic to 1 (Mochi / LTX-style)."""
    if steps == 1:
        return torch.tensor([ms.sigma_max, 0.0])
    lin_steps = steps // 2
    linear = [i * threshold / lin_steps for i in range(lin_steps)]
    d = lin_steps - threshold * steps
    q = steps - lin_steps
    qc = d / (lin_steps * q**2)
    lc = threshold / lin_steps - 2 * d / q**2
    c = qc * lin_steps**2
    quad = [qc * i**2 + lc * i + c for i in range(lin_steps, steps)]
    return torch.tensor([(1.0 - x) * ms.sigma_max for x in linear + quad + [1.0]], dtype=torch.float32)


def _betainc(x: np.ndarray, a: float, b: float, points: int = 4001) -> np.ndarray:
    """Regularised incomplete beta I_x(a, b) for x <= 0.5, by Simpson's rule after u = t^a (which removes
    the t^(a-1) singularity at 0; (1 - t)^(b-1) is smooth on [0, 0.5])."""
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    out = np.empty_like(x)
    for i, xi in enumerate(x):
        u = np.linspace(0.0, xi**a, points)
        f = (1 - u ** (1 / a)) ** (b - 1)
        h = u[1] - u[0]
        out[i] = h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum()) / a / math.exp(log_beta)
    return out


def beta_cdf(x: np.ndarray, a: float, b: float) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    low = x <= 0.5
    out = np.empty_like(x)
    out[low] = _betainc(x[low], a, b)
    out[~low] = 1 - _betainc(1 - x[~low], b, a)
    return out


def beta_ppf(q: np.ndarray, a: float, b: float) -> np.ndarray:
    lo, hi = np.zeros_like(q, dtype=np.float64), np.ones_like(q, dtype=np.float64)
    for _ in range(50):  # bisection: 2^-50
        mid = (lo + hi) / 2
        below = beta_cdf(mid, a, b) < q
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    out = (lo + hi) / 2
    if a == b:  # the median of a symmetric beta is exactly 0.5; quadrature error must not move it
        out = np.where(q == 0.5, 0.5, out)
    return out


def _round_half_up(x: np.ndarray) -> np.ndarray:
    """ComfyUI rounds with rint (ties to even), but its SciPy puts BetaPPF(0.5; 0.6, 0.6) one ulp above 0.5
    (0.5000000000000001), so the only tie a schedule meets, the median at 0.5 (L - 1) for an odd L - 1,
    rounds up there on every table: index 25 on the 50-entry LCM table (rint would give 24), 500 on 1000
    entries, 5000 on 10000. Elsewhere BetaPPF (L - 1) is never within quadrature error of a half-integer."""
    return np.floor(x + 0.5)


@register("beta")
def beta(ms: FlowSampling, steps: int, alpha: float = 0.6, beta_: float = 0.6) -> torch.Tensor:
    """S[round(BetaPPF(1 - i/N; 0.6, 0.6) (L - 1))], repeats dropped: dense at both ends."""
    r = 1 - np.linspace(0, 1, steps, endpoint=False)
    idx = _round_half_up(beta_ppf(r, alpha, beta_) * (ms.length - 1)).astype(int)
    keep = [int(i) for n, i in enumerate(idx) if n == 0 or i != idx[n - 1]]
    return _append_zero(ms.table[keep])
