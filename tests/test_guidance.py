"""Guidance methods against their formulas and the reference's edge cases."""

from __future__ import annotations

import pytest
import torch

from flowtuner.errors import ConfigError
from flowtuner.guidance.methods import METHODS, Step, parse_guidance, plain_cfg

G = torch.Generator().manual_seed(0)


def rand(*shape):
    return torch.randn(*shape, generator=G)


def step(scale=4.0, sigma=0.6, uncond=True):
    x, dc = rand(2, 16, 6, 8), rand(2, 16, 6, 8)
    return Step(x, sigma, scale, dc, rand(2, 16, 6, 8) if uncond else None)


def run(name, s, **params):
    m = METHODS[name]
    p = {**m.defaults, **params}
    return m.fn(s, p, {}) if m.stage != "post" else m.fn(s, plain_cfg(s, p, {}), p, {})


def test_parse_guidance():
    assert parse_guidance("apg:eta=0.5,norm_threshold=20") == ("apg", {"eta": 0.5, "norm_threshold": 20.0, "momentum": 0.0})
    with pytest.raises(ConfigError, match="unknown; choose one of rescale_cfg"):
        parse_guidance("nope")
    with pytest.raises(ConfigError, match="unknown option 'etaa'; valid: eta, norm_threshold, momentum"):
        parse_guidance("apg:etaa=1")
    # UNet-only methods parse everywhere and are refused by a family without a UNet, not ComfyUI's silent no-op on a
    # DiT: FreeU in tests/test_sdxl_guidance.py, SAG in tests/test_sdxl_sag.py


def test_apg_equals_cfg_at_w_plus_one_without_norm_or_momentum():
    s = step(scale=3.0)
    cond, uncond = run("apg", s, eta=1.0, norm_threshold=0.0, momentum=0.0)
    guided = uncond + 3.0 * (cond - uncond)
    torch.testing.assert_close(guided, s.uncond + 4.0 * (s.cond - s.uncond), atol=2e-5, rtol=1e-5)


def test_apg_eta_zero_removes_the_parallel_part_and_momentum_resets():
    s = step()
    cond, _ = run("apg", s, eta=0.0, norm_threshold=0.0)
    g = cond - s.uncond - (s.cond - s.uncond) / s.scale
    dims = (-1, -2, -3)
    assert (g * s.cond).sum(dims).abs().max() < 1e-3  # orthogonal to D_c
    m = METHODS["apg"]
    p, state = {**m.defaults, "momentum": 0.5, "norm_threshold": 0.0}, {}
    m.fn(step(sigma=0.8), p, state)
    m.fn(step(sigma=0.5), p, state)
    assert "running" in state
    fresh = step(sigma=0.9)  # sigma rises: a new run, momentum restarts from this guidance
    m.fn(fresh, p, state)
    torch.testing.assert_close(state["running"], fresh.cond - fresh.uncond)


def test_rescale_cfg():
    s = step()
    torch.testing.assert_close(run("rescale_cfg", s, multiplier=0.0), plain_cfg(s, {}, {}), atol=1e-5, rtol=1e-5)
    no_u = step(uncond=False)
    assert torch.equal(run("rescale_cfg", no_u), no_u.cond)
    full = run("rescale_cfg", s, multiplier=1.0)
    k = (s.sigma**2 + 1) ** 0.5 / s.sigma
    x = s.x / (s.sigma**2 + 1)
    v_c, v_full = (x - s.cond) * k, (x - full) * k
    torch.testing.assert_close(v_full.std(dim=(1, 2, 3)), v_c.std(dim=(1, 2, 3)), atol=1e-4, rtol=1e-4)


def test_renorm_cfg():
    s = step(sigma=0.6)
    assert torch.equal(run("renorm_cfg", s, cfg_trunc=0.5), s.cond)  # sigma >= cfg_trunc: no CFG
    out = run("renorm_cfg", s, renorm_cfg=1.0)
    n_out, n_c = out.flatten(1).norm(dim=1), s.cond.flatten(1).norm(dim=1)
    assert (n_out <= n_c * 1.0001).all()
    torch.testing.assert_close(run("renorm_cfg", s, renorm_cfg=0.0), plain_cfg(s, {}, {}))


def test_cfg_norm_and_cfg_zero_star_and_mahiro():
    s = step()
    d = plain_cfg(s, {}, {})
    out = run("cfg_norm", s, strength=1.0)
    assert (out.norm(dim=1) <= s.cond.norm(dim=1) * 1.0001 + 1e-6).all()
    ratio = (s.cond.norm(dim=1, keepdim=True) / (d.norm(dim=1, keepdim=True) + 1e-8)).clamp(0, 1)
    torch.testing.assert_close(run("cfg_norm", s, strength=0.5), d * ratio * 0.5)
    a, b = s.x - s.cond, s.x - s.uncond
    alpha = (a * b).sum((1, 2, 3), keepdim=True) / ((b * b).sum((1, 2, 3), keepdim=True) + 1e-8)
    torch.testing.assert_close(run("cfg_zero_star", s), d + s.uncond * (alpha - 1) + s.scale * s.uncond * (1 - alpha))
    one = Step(s.x, s.sigma, 1.0, s.cond, torch.zeros_like(s.cond))
    torch.testing.assert_close(run("mahiro", one), s.cond, atol=1e-6, rtol=1e-6)  # cfg = 1: unchanged


def test_tcfg_projects_the_unconditional_score():
    s = step()
    cond, uncond = run("tcfg", s)
    assert torch.equal(cond, s.cond)
    s_u = (s.x - uncond).reshape(2, -1)
    a = torch.stack([(s.x - s.uncond).reshape(2, -1), (s.x - s.cond).reshape(2, -1)], dim=1)
    v1 = torch.linalg.svd(a, full_matrices=False)[2][:, 0]
    cos = torch.nn.functional.cosine_similarity(s_u, v1, dim=1).abs()
    assert (cos > 0.9999).all()
    parallel = Step(s.x, 0.5, 4.0, s.x - 2 * (s.x - s.uncond), s.uncond)  # scores along one direction
    torch.testing.assert_close(run("tcfg", parallel)[1], s.uncond, atol=1e-4, rtol=1e-4)


def test_fresca_scales_low_and_high_frequencies():
    s = step()
    same = run("fresca", s, scale_low=1.5, scale_high=1.5)[0]
    torch.testing.assert_close(same - s.uncond, 1.5 * (s.cond - s.uncond), atol=1e-5, rtol=1e-5)
    flat = Step(s.x, 0.5, 4.0, s.uncond + 1.0, s.uncond)  # constant guidance: only the zero frequency
    torch.testing.assert_close(run("fresca", flat, scale_low=0.5, scale_high=3.0, freq_cutoff=1)[0] - s.uncond,
                               torch.full_like(s.uncond, 0.5), atol=1e-5, rtol=1e-5)


def test_guidance_from_the_cli(tmp_path, tiny_files):
    from safetensors.torch import load_file

    from flowtuner.cli import main

    base = ["generate", "--model", str(tiny_files["repo"]), "--device", "cpu", "--image_size", "64", "64",
            "--infer_steps", "3", "--seed", "2", "--prompt", "x", "--output_type", "latent"]
    assert main(base + ["--save_path", str(tmp_path / "a")]) == 0
    assert main(base + ["--save_path", str(tmp_path / "b"), "--guidance", "apg:eta=0.5", "--guidance", "cfg_norm"]) == 0
    assert main(base + ["--save_path", str(tmp_path / "c"), "--guidance", "rescale_cfg:multiplier=0.7", "mahiro"]) == 0
    a, b, c = (load_file(next((tmp_path / n).glob("*.safetensors")))["latent"] for n in "abc")
    assert (a - b).abs().max() > 1e-4 and (a - c).abs().max() > 1e-4
    assert main(base + ["--save_path", str(tmp_path / "d"), "--guidance", "apg:nope=1"]) == 2
