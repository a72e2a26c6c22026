"""Samplers on analytic cases: data at one point (every sampler must land on it), and Gaussian data,
whose probability-flow ODE maps noise eps to mu + s eps exactly."""

from __future__ import annotations

import pytest
import torch

from flowtuner.flow.samplers import SAMPLERS
from flowtuner.flow.schedules import reference_sigmas

MU, S = 0.5, 0.3


def gaussian_velocity(x, sigma):
    """Exact v = (x - E[x0 | x_t]) / sigma for x0 ~ N(MU, S^2), x_t = (1 - sigma) x0 + sigma eps."""
    a = 1 - sigma
    d = MU + a * S**2 / (a**2 * S**2 + sigma**2) * (x - a * MU)
    return (x - d) / sigma


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_point_mass_is_reached_exactly(name):
    x0 = torch.randn(3, 4, 2)
    model = lambda x, s: (x - x0) / s  # noqa: E731
    out = SAMPLERS[name](model, torch.randn_like(x0), reference_sigmas(8, 1024), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)


def _ode_error(name, steps):
    """Max error against the exact transport, on a linear schedule (the reference schedule's fixed
    terminal step would put a floor under every sampler's error)."""
    eps = torch.randn(4000, generator=torch.Generator().manual_seed(0))
    out = SAMPLERS[name](gaussian_velocity, eps.clone(), torch.linspace(1, 0, steps + 1))
    return (out - (MU + S * eps)).abs().max().item()


def test_convergence_orders():
    euler = [_ode_error("euler", n) for n in (20, 40, 80)]
    assert 1.8 < euler[0] / euler[1] < 2.2 and 1.8 < euler[1] / euler[2] < 2.2  # first order
    heun = [_ode_error("heun", n) for n in (20, 40, 80)]
    assert heun[0] / heun[1] > 3.5 and heun[1] / heun[2] > 3.5  # second order
    for name in ("dpmpp_2m", "res_multistep"):  # multistep: second order once the history exists
        errors = [_ode_error(name, n) for n in (20, 40, 80)]
        assert errors[0] < euler[0] / 3 and errors[0] > errors[1] > errors[2] and errors[1] / errors[2] > 2.5, name


def test_ancestral_sampling_reaches_the_data_distribution():
    stds = []
    for steps in (10, 100):
        eps = torch.randn(20000, generator=torch.Generator().manual_seed(1))
        out = SAMPLERS["euler_ancestral"](gaussian_velocity, eps, reference_sigmas(steps, 1024), generator=torch.Generator().manual_seed(2))
        assert out.mean().item() == pytest.approx(MU, abs=0.01)
        stds.append(out.std().item())
    assert abs(stds[1] - S) < abs(stds[0] - S) and stds[1] == pytest.approx(S, abs=0.025)


def test_lcm_keeps_the_mean():
    """LCM re-noises the denoised estimate; with an exact MMSE model its samples are the posterior means'
    spread (narrower than the data): the mean is the property that holds."""
    eps = torch.randn(20000, generator=torch.Generator().manual_seed(1))
    out = SAMPLERS["lcm"](gaussian_velocity, eps, reference_sigmas(8, 1024), generator=torch.Generator().manual_seed(2))
    assert out.mean().item() == pytest.approx(MU, abs=0.01) and 0 < out.std().item() < S
