"""Samplers on analytic cases: data at one point (every sampler must land on it), and Gaussian data,
whose probability-flow ODE maps noise eps to mu + s eps exactly."""

from __future__ import annotations

import math

import pytest
import torch

from flowtuner.flow.samplers import FLOW, SAMPLERS, VE
from flowtuner.families.qwen_image.family import SHIFT_LINE
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
    out = SAMPLERS[name](model, torch.randn_like(x0), reference_sigmas(8, 1024, SHIFT_LINE), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)


def _ode_error(name, steps):
    """Max error against the exact transport, on a linear schedule (the reference schedule's fixed
    terminal step would put a floor under every sampler's error)."""
    eps = torch.randn(4000, generator=torch.Generator().manual_seed(0))
    if name == "dpmpp_2m_sde_eta0":
        return (SAMPLERS["dpmpp_2m_sde"](gaussian_velocity, eps.clone(), torch.linspace(1, 0, steps + 1), eta=0.0)
                - (MU + S * eps)).abs().max().item()
    out = SAMPLERS[name](gaussian_velocity, eps.clone(), torch.linspace(1, 0, steps + 1))
    return (out - (MU + S * eps)).abs().max().item()


def test_convergence_orders():
    euler = [_ode_error("euler", n) for n in (20, 40, 80)]
    assert 1.8 < euler[0] / euler[1] < 2.2 and 1.8 < euler[1] / euler[2] < 2.2  # first order
    heun = [_ode_error("heun", n) for n in (20, 40, 80)]
    assert heun[0] / heun[1] > 3.5 and heun[1] / heun[2] > 3.5  # second order
    # with eta 0 the SDE solver is an ODE solver; its huge first step (from sigma 1 - 1e-4) makes the error
    # uneven at few steps, so the order is read further out
    sde = [_ode_error("dpmpp_2m_sde_eta0", n) for n in (40, 80, 160)]
    assert sde[1] < euler[2] / 3 and sde[0] > sde[1] > sde[2] and sde[1] / sde[2] > 2.5
    for name in ("dpmpp_2m", "res_multistep"):  # multistep: second order once the history exists
        errors = [_ode_error(name, n) for n in (20, 40, 80)]
        assert errors[0] < euler[0] / 3 and errors[0] > errors[1] > errors[2] and errors[1] / errors[2] > 2.5, name


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m_sde"])
def test_stochastic_sampling_reaches_the_data_distribution(name):
    stds = []
    for steps in (10, 100):
        eps = torch.randn(20000, generator=torch.Generator().manual_seed(1))
        out = SAMPLERS[name](gaussian_velocity, eps, reference_sigmas(steps, 1024, SHIFT_LINE), generator=torch.Generator().manual_seed(2))
        assert out.mean().item() == pytest.approx(MU, abs=0.01)
        stds.append(out.std().item())
    assert abs(stds[1] - S) < abs(stds[0] - S) and stds[1] == pytest.approx(S, abs=0.025)


def test_lcm_keeps_the_mean():
    """LCM re-noises the denoised estimate; with an exact MMSE model its samples are the posterior means'
    spread (narrower than the data): the mean is the property that holds."""
    eps = torch.randn(20000, generator=torch.Generator().manual_seed(1))
    out = SAMPLERS["lcm"](gaussian_velocity, eps, reference_sigmas(8, 1024, SHIFT_LINE), generator=torch.Generator().manual_seed(2))
    assert out.mean().item() == pytest.approx(MU, abs=0.01) and 0 < out.std().item() < S


def ve_velocity(x, sigma):
    """d = (x - D) / sigma for x0 ~ N(MU, S^2) and VE noising x = x0 + sigma eps (ComfyUI's space for
    discrete eps / v models)."""
    d = MU + S**2 / (S**2 + sigma**2) * (x - MU)
    return (x - d) / sigma


def test_flow_and_ve_noising_differ_where_they_should():
    assert FLOW.alpha(0.25) == 0.75 and VE.alpha(0.25) == 1.0
    assert FLOW.half_log_snr(0.5) == 0.0 and VE.half_log_snr(1.0) == 0.0


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m", "dpmpp_2m_sde", "euler_ancestral"])
def test_ve_sampling_reaches_the_data_distribution(name):
    """Exponential schedule 14.6 -> 0.03 (SD's table ends), start x = sigma_max eps (+ the data mean, as
    ComfyUI's noise_scaling adds the zero latent). The stochastic samplers must use the VE branch: the
    flow formulas (alpha = 1 - sigma) would blow up at sigma > 1."""
    sigmas = torch.cat([torch.exp(torch.linspace(math.log(14.6146), math.log(0.0291672), 40)), torch.zeros(1)])
    eps = torch.randn(20000, generator=torch.Generator().manual_seed(3))
    out = SAMPLERS[name](ve_velocity, eps * float(sigmas[0]), sigmas, generator=torch.Generator().manual_seed(4), noising=VE)
    assert out.mean().item() == pytest.approx(MU, abs=0.02), name
    assert out.std().item() == pytest.approx(S, abs=0.03), name
