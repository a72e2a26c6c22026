"""Discrete-time model sampling (eps / v_prediction / x0 / lcm, zsnr) on a toy model: Gaussian data, whose
exact denoiser is known in closed form, wrapped as each prediction type would predict it in VP terms."""

from __future__ import annotations

import math

import pytest
import torch

from flowtuner.flow.discrete import PREDICTIONS, as_sampler_model, discrete, lcm_distilled, noise_scaling
from flowtuner.flow.samplers import SAMPLERS, VE
from flowtuner.flow.schedulers import SCHEDULERS

MU, S = 0.5, 0.3


def test_table_ends_match_the_reference():
    ms = discrete()
    assert ms.length == 1000
    assert ms.sigma_min == pytest.approx(0.0291672, rel=1e-5) and ms.sigma_max == pytest.approx(14.6146412, rel=1e-6)
    z = discrete(zsnr=True)
    assert z.sigma_min == pytest.approx(0.0291672, rel=1e-5)
    assert z.sigma_max == pytest.approx(4518.76, rel=1e-5) and float(z.table[-2]) == pytest.approx(2254.24, rel=1e-5)


def test_timestep_and_sigma_maps():
    ms = discrete()
    t = torch.tensor([0.0, 1.0, 500.0, 999.0])
    assert torch.equal(ms.timestep(ms.sigma(t)), t)
    mid = float(ms.sigma(torch.tensor(10.5)))
    assert mid == pytest.approx(math.sqrt(float(ms.table[10]) * float(ms.table[11])), rel=1e-6)  # log-linear
    assert float(ms.sigma(torch.tensor(-5.0))) == ms.sigma_min and float(ms.sigma(torch.tensor(2000.0))) == ms.sigma_max
    assert ms.percent_to_sigma(0.0) > 1e8 and ms.percent_to_sigma(1.0) == 0.0
    assert ms.percent_to_sigma(0.5) == pytest.approx(float(ms.sigma(torch.tensor(499.5))))


def test_lcm_table():
    base = discrete()
    lcm = lcm_distilled(base)
    assert lcm.length == 50
    for j in (0, 1, 49):
        assert float(lcm.table[49 - j]) == float(base.table[999 - 20 * j])
    assert [int(lcm.timestep(lcm.table[k])) for k in (0, 1, 49)] == [19, 39, 999]
    assert float(lcm.sigma(torch.tensor(39.0))) == pytest.approx(float(lcm.table[1]), rel=1e-6)


def vp_network(kind: str, ms):
    """What an ideal network of each kind outputs for x0 ~ N(MU, S^2), given the VP sample
    x_vp = a x0 + b eps (a = 1/sqrt(1 + sigma^2), b = sigma a) and its integer timestep."""

    def net(x_vp, t):
        sigma = float(ms.table[int((float(t) - ms.offset) / ms.stride)])
        a = 1 / math.sqrt(1 + sigma**2)
        b = sigma * a
        x0 = MU + a * S**2 / (a**2 * S**2 + b**2) * (x_vp - a * MU)
        eps = (x_vp - a * x0) / b
        return {"eps": eps, "lcm": eps, "v_prediction": a * eps - b * x0, "x0": x0}[kind]

    return net


@pytest.mark.parametrize("kind", ["eps", "v_prediction", "x0"])
def test_prediction_types_recover_the_denoised_estimate(kind):
    ms = discrete()
    sigma = float(ms.table[700])
    x = torch.linspace(-20, 20, 11)
    model = as_sampler_model(vp_network(kind, ms), ms, PREDICTIONS[kind])
    exact = MU + S**2 / (S**2 + sigma**2) * (x - MU)  # VE posterior mean
    torch.testing.assert_close(x - sigma * model(x, torch.tensor(sigma)), exact, atol=1e-4, rtol=1e-5)


def test_lcm_boundary_condition():
    lcm = lcm_distilled(discrete())
    sigma = float(lcm.table[3])  # timestep 79 -> t~ = 790
    x, out = torch.tensor([2.0]), torch.tensor([0.5])
    t = 790.0
    expected = t / math.sqrt(t**2 + 0.25) * (x - out * sigma) + 0.25 / (t**2 + 0.25) * x
    torch.testing.assert_close(PREDICTIONS["lcm"].denoised(lcm, sigma, out, x), expected)


@pytest.mark.parametrize("kind,zsnr", [("eps", False), ("v_prediction", False), ("x0", False), ("v_prediction", True)])
def test_sampling_a_discrete_model_follows_the_exact_flow(kind, zsnr):
    """The whole chain: table -> simple schedule -> noise_scaling from the top -> DPM++ 2M in VE space with
    the prediction type's D, against the exact probability-flow transport of Gaussian data down to the last
    sigma followed by the final jump to D. Points of the simple schedule lie on the table, so the toy
    network sees exact sigmas. (zsnr puts the start at sigma 4519, where x is ~1e4 times the data.)"""
    ms = discrete(zsnr=zsnr)
    sigmas = SCHEDULERS["simple"](ms, 50)
    top, last = float(sigmas[0]), float(sigmas[-2])
    noise = torch.randn(20000, generator=torch.Generator().manual_seed(0))
    x = noise_scaling(top, noise, torch.zeros(()), max_denoise=True)
    out = SAMPLERS["dpmpp_2m"](as_sampler_model(vp_network(kind, ms), ms, PREDICTIONS[kind]), x, sigmas, noising=VE)
    x_last = MU + (x - MU) * math.sqrt(S**2 + last**2) / math.sqrt(S**2 + top**2)
    exact = MU + S**2 / (S**2 + last**2) * (x_last - MU)
    assert (out - exact).abs().max().item() < 0.01


def test_lcm_sampling_on_the_distilled_table():
    lcm = lcm_distilled(discrete())
    sigmas = SCHEDULERS["simple"](lcm, 4)
    noise = torch.randn(20000, generator=torch.Generator().manual_seed(0))
    x = noise_scaling(float(sigmas[0]), noise, torch.zeros(()), max_denoise=True)
    out = SAMPLERS["lcm"](as_sampler_model(vp_network("lcm", lcm), lcm, PREDICTIONS["lcm"]), x, sigmas,
                          generator=torch.Generator().manual_seed(1), noising=VE)
    assert out.mean().item() == pytest.approx(MU, abs=0.01) and 0 < out.std().item() < S + 0.01
