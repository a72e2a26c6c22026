"""Training timestep samplers and loss weightings against their formulas (quantiles, densities)."""

from __future__ import annotations

import math

import pytest
import torch

from flowtuner.errors import ConfigError
from flowtuner.flow.timesteps import TimestepOptions, check_options, sample_sigmas
from flowtuner.flow.weighting import WEIGHTINGS, _mode_map

N = 200_000
Z90 = 1.2815516  # standard normal 90 % quantile


def draw(name, tokens=4096, **opts):
    opt = TimestepOptions(**opts)
    check_options(name, opt)
    return sample_sigmas(name, N, torch.Generator().manual_seed(0), opt, tokens)


def quantiles(x):
    return torch.quantile(x[:100_000], torch.tensor([0.1, 0.5, 0.9])).tolist()


def sig(x):
    return 1 / (1 + math.exp(-x))


def sd3(t, s):
    return s * t / (1 + (s - 1) * t)


@pytest.mark.parametrize("name,opts,tokens,expected", [
    ("uniform", {}, 4096, [0.1, 0.5, 0.9]),
    ("sigmoid", {"sigmoid_scale": 1.0}, 4096, [sig(-Z90), 0.5, sig(Z90)]),
    ("sigmoid", {"sigmoid_scale": 2.0}, 4096, [sig(-2 * Z90), 0.5, sig(2 * Z90)]),
    ("shift", {"discrete_flow_shift": 3.0}, 4096, [sd3(sig(-Z90), 3), 0.75, sd3(sig(Z90), 3)]),
    ("qwen_shift", {}, 4096, [sd3(sig(-Z90), math.exp(0.69355)), sd3(0.5, math.exp(0.69355)), sd3(sig(Z90), math.exp(0.69355))]),
    ("qwen_shift", {}, 1024, [sd3(sig(-Z90), 1.7137), sd3(0.5, 1.7137), sd3(sig(Z90), 1.7137)]),
    ("flux_shift", {}, 4096, [sd3(sig(-Z90), math.exp(1.15)), sd3(0.5, math.exp(1.15)), sd3(sig(Z90), math.exp(1.15))]),
    ("logsnr", {"logit_mean": -6.0, "logit_std": 2.0}, 4096, [sig(3 - Z90), sig(3), sig(3 + Z90)]),
    ("logit_normal", {"logit_mean": math.log(3.0), "logit_std": 1.0}, 4096,
     [sig(math.log(3) - Z90), 0.75, sig(math.log(3) + Z90)]),
])
def test_sampler_quantiles(name, opts, tokens, expected):
    assert quantiles(draw(name, tokens, **opts)) == pytest.approx(expected, abs=0.006)


def test_qinglong_qwen_mixes_in_five_percent_low_sigma():
    base, mixed = draw("qwen_shift"), draw("qinglong_qwen")
    extra = (mixed < 0.15).float().mean() - (base < 0.15).float().mean()
    assert extra == pytest.approx(0.05 * 0.96, abs=0.006)  # P(sigmoid(-N(5.36,1)/2) < 0.15) = 0.96


def test_min_max_rescale_and_preserve_shape():
    t = draw("uniform", min_timestep=200, max_timestep=400)
    assert t.min() >= 0.2 and t.max() <= 0.4
    assert quantiles(t) == pytest.approx([0.22, 0.3, 0.38], abs=0.004)
    kept = draw("shift", discrete_flow_shift=3.0, min_timestep=500, max_timestep=1000, preserve_distribution_shape=True)
    ref = draw("shift", discrete_flow_shift=3.0)
    ref = ref[ref >= 0.5]
    assert kept.min() >= 0.5 and quantiles(kept) == pytest.approx(quantiles(ref), abs=0.006)


def test_flags_a_sampler_ignores_are_errors():
    with pytest.raises(ConfigError, match="--discrete_flow_shift has no effect with --timestep_sampling qwen_shift; it is read by: shift"):
        check_options("qwen_shift", TimestepOptions(discrete_flow_shift=2.2))
    with pytest.raises(ConfigError, match="unknown"):
        check_options("sigma", TimestepOptions())
    with pytest.raises(ConfigError, match="need 0 <= min < max <= 1000"):
        check_options("uniform", TimestepOptions(min_timestep=500, max_timestep=100))


def test_weightings():
    s = torch.tensor([0.25, 0.5])
    assert WEIGHTINGS["none"](s, {}).tolist() == [1.0, 1.0]
    assert WEIGHTINGS["sigma_sqrt"](s, {}).tolist() == pytest.approx([16.0, 4.0])
    assert WEIGHTINGS["cosmap"](s, {}).tolist() == pytest.approx([2 / (math.pi * 0.625), 2 / (math.pi * 0.5)])
    grid = torch.linspace(0.0005, 0.9995, 2000)
    for name, opt in (("logit_normal", {"logit_mean": 0.5, "logit_std": 1.2}), ("mode", {"mode_scale": 1.29})):
        density = WEIGHTINGS[name](grid, opt)
        assert (density.mean() * 0.999).item() == pytest.approx(1.0, abs=0.01), name  # a probability density
    # the mode density matches a histogram of SD3's mode sampler
    t = _mode_map(torch.rand(N, generator=torch.Generator().manual_seed(1)), 1.29)
    hist = torch.histc(t, bins=10, min=0, max=1) / N * 10
    fine = (torch.arange(1000) + 0.5) / 1000
    bin_means = WEIGHTINGS["mode"](fine, {"mode_scale": 1.29}).reshape(10, 100).mean(1)
    assert hist.tolist() == pytest.approx(bin_means.tolist(), rel=0.02)
