"""Training timestep samplers and loss weightings against their formulas (quantiles, densities)."""

from __future__ import annotations

import math

import pytest
import torch

from flowtuner.errors import ConfigError
from flowtuner.flow.timesteps import SAMPLERS, TimestepOptions, check_options, ignored_options, loss_weighting, sample_sigmas
from flowtuner.flow.weighting import WEIGHTINGS, _mode_map
from flowtuner.families.qwen_image.family import SHIFT_LINE

N = 200_000
Z90 = 1.2815516  # standard normal 90 % quantile


def draw(name, tokens=4096, **opts):
    opt = TimestepOptions(**opts, shift_line=SHIFT_LINE)  # what the trainer sets for Qwen-Image
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
    # flux2_shift reads the unpacked latent area h w = 4 tokens: 1024 tokens -> 4096 -> mu 1.15
    ("flux2_shift", {}, 1024, [sd3(sig(-Z90), math.exp(1.15)), sd3(0.5, math.exp(1.15)), sd3(sig(Z90), math.exp(1.15))]),
    ("krea2_shift", {}, 6400, [sd3(sig(-Z90), math.exp(1.15)), sd3(0.5, math.exp(1.15)), sd3(sig(Z90), math.exp(1.15))]),
    # ideogram4_shift: sigmoid(ln(tokens / 256) / 2 + 1.5 z); 4096 tokens -> mean ln(16) / 2
    ("ideogram4_shift", {}, 4096, [sig(math.log(4) - 1.5 * Z90), sig(math.log(4)), sig(math.log(4) + 1.5 * Z90)]),
    # sigma: u from the weighting density, sigma = 1 - int(1000 u) / 1000 (the table, unshifted), within 0.001
    ("sigma", {"discrete_flow_shift": 5.0}, 4096, [0.1, 0.5, 0.9]),
    ("sigma", {"weighting_scheme": "logit_normal", "logit_mean": 0.5}, 4096, [1 - sig(0.5 + Z90), 1 - sig(0.5), 1 - sig(0.5 - Z90)]),
    ("logsnr", {"logit_mean": -6.0, "logit_std": 2.0}, 4096, [sig(3 - Z90), sig(3), sig(3 + Z90)]),
    ("logit_normal", {"logit_mean": math.log(3.0), "logit_std": 1.0}, 4096,
     [sig(math.log(3) - Z90), 0.75, sig(math.log(3) + Z90)]),
])
def test_sampler_quantiles(name, opts, tokens, expected):
    assert quantiles(draw(name, tokens, **opts)) == pytest.approx(expected, abs=0.006)


def test_sigma_sampler_is_the_discrete_table_indexed_by_min_max():
    t = draw("sigma")
    assert torch.allclose(t, torch.round(t * 1000) / 1000, atol=1e-6) and len(t.unique()) == 1000
    assert t.max() == 1.0 and t.min() == pytest.approx(0.001)
    # --min/--max_timestep index the descending table: indices 200..399 are sigmas 0.8 .. 0.601 (musubi-tuner's quirk)
    r = draw("sigma", min_timestep=200, max_timestep=400)
    assert r.max() == pytest.approx(0.8) and r.min() == pytest.approx(0.601)
    mode = draw("sigma", weighting_scheme="mode", mode_scale=1.29)
    u = torch.tensor([0.1, 0.5, 0.9])  # quantiles of 1 - mode_map(U): mode_map decreases, so they map in order
    assert quantiles(mode) == pytest.approx((1 - _mode_map(u, 1.29)).tolist(), abs=0.006)
    # the density the sampler drew from weights no loss; other weightings still do
    assert loss_weighting("sigma", "logit_normal") == "none" and loss_weighting("sigma", "cosmap") == "cosmap"
    assert loss_weighting("shift", "logit_normal") == "logit_normal"


def test_qinglong_flux_mixes_flux_shift_logsnr_and_low_sigma():
    base = draw("flux_shift", tokens=1024)
    mixed = draw("qinglong_flux", tokens=1024, logit_mean=-6.0, logit_std=2.0)
    # logsnr(-6, 2) puts sigma above 0.97 with P(N(-6, 2) < -7) = 0.31; flux_shift at 1024 tokens almost never
    high = (mixed > 0.97).float().mean() - (base > 0.97).float().mean()
    assert high == pytest.approx(0.11 * 0.3085, abs=0.006)
    low = (mixed < 0.15).float().mean() - 0.79 * (base < 0.15).float().mean()
    assert low == pytest.approx(0.10 * 0.96, abs=0.006)  # P(sigmoid(-N(5.36,1)/2) < 0.15) = 0.96


SAME_DRAWS = [(name, "none") for name in SAMPLERS if name != "logit_normal"] + [("sigma", "logit_normal"), ("sigma", "mode")]


@pytest.mark.parametrize("name,scheme", SAME_DRAWS)
@pytest.mark.parametrize("lo,hi", [(None, None), (100, 700)])
def test_samplers_match_musubi_tuner_draw_for_draw(musubi, name, scheme, lo, hi):
    """musubi-tuner's get_noisy_model_input_and_timesteps on the global generator seeded like flowtuner's: the
    same sigmas (noise = 1 and latents = 0 make its noisy input the sigma itself). flowtuner's logit_normal is
    its own (bigASP's), not a musubi-tuner mode."""
    from types import SimpleNamespace

    from musubi_tuner.modules.scheduling_flow_match_discrete import FlowMatchDiscreteScheduler
    from musubi_tuner.training.trainer_base import NetworkTrainer

    args = SimpleNamespace(timestep_sampling=name, sigmoid_scale=1.3, discrete_flow_shift=2.2, logit_mean=0.3, logit_std=1.2,
                           mode_scale=1.29, weighting_scheme=scheme, min_timestep=lo, max_timestep=hi,
                           preserve_distribution_shape=False)
    trainer = NetworkTrainer.__new__(NetworkTrainer)  # the method reads no state but the bucket count
    trainer.num_timestep_buckets = None
    latents = torch.zeros(2048, 1, 1, 48, 80)  # one channel is enough: it reads the 48 x 80 grid (960 tokens)
    torch.manual_seed(11)
    noisy, _ = trainer.get_noisy_model_input_and_timesteps(args, torch.ones_like(latents), latents, None,
                                                          FlowMatchDiscreteScheduler(shift=2.2), "cpu", torch.float32)
    opt = TimestepOptions(1.3, 2.2, 0.3, 1.2, lo, hi, False, scheme, 1.29, SHIFT_LINE)
    ours = sample_sigmas(name, 2048, torch.Generator().manual_seed(11), opt, 24 * 40)
    assert torch.allclose(ours, noisy[:, 0, 0, 0, 0], atol=2e-7, rtol=0)


def test_preserve_distribution_shape_matches_musubi_tuner_in_distribution(musubi):
    from types import SimpleNamespace

    from musubi_tuner.training.trainer_base import NetworkTrainer

    args = SimpleNamespace(timestep_sampling="qwen_shift", sigmoid_scale=1.0, min_timestep=300, max_timestep=600,
                           preserve_distribution_shape=True)
    trainer = NetworkTrainer.__new__(NetworkTrainer)
    trainer.num_timestep_buckets = None
    latents = torch.zeros(1000, 1, 1, 128, 128)  # 4096 tokens; small batches keep the noisy inputs small
    torch.manual_seed(2)
    theirs = torch.cat([trainer.get_noisy_model_input_and_timesteps(args, torch.ones_like(latents), latents, None, None,
                                                                    "cpu", torch.float32)[0][:, 0, 0, 0, 0] for _ in range(8)])
    ours = draw("qwen_shift", 4096, min_timestep=300, max_timestep=600, preserve_distribution_shape=True)
    assert quantiles(ours[:8000]) == pytest.approx(quantiles(theirs), abs=0.006)


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


def test_flags_a_sampler_ignores_are_one_warning_line_each(caplog):
    check_options("qwen_shift", TimestepOptions(discrete_flow_shift=2.2, logit_std=2.0))
    assert [r.getMessage() for r in caplog.records] == [
        "--discrete_flow_shift has no effect with --timestep_sampling qwen_shift (read by: shift); ignored, as musubi-tuner does.",
        "--logit_std has no effect with --timestep_sampling qwen_shift (read by: logsnr, qinglong_flux, logit_normal); "
        "ignored, as musubi-tuner does."]
    caplog.clear()
    check_options("sigma", TimestepOptions(logit_mean=1.0, weighting_scheme="logit_normal"))  # read as the sampling density
    check_options("uniform", TimestepOptions(logit_mean=1.0, weighting_scheme="logit_normal"))  # read as the loss weight
    assert not caplog.records
    assert ignored_options("sigma", TimestepOptions(discrete_flow_shift=3.0, preserve_distribution_shape=True)) == [
        "--discrete_flow_shift has no effect with --timestep_sampling sigma (read by: shift); ignored, as musubi-tuner does.",
        "--preserve_distribution_shape has no effect with --timestep_sampling sigma: --min/--max_timestep index its table "
        "directly; ignored, as musubi-tuner does."]
    with pytest.raises(ConfigError, match="unknown"):
        check_options("sigma_v2", TimestepOptions())
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
