"""flowtuner demo --family sdxl: its CLIP-format vocabulary, the VAE's latent normalisation folded into the model,
the flags, and real runs (a few-step run that writes every file; a reduced run that must reach the goal)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from flowtuner.cli import main
from flowtuner.demo.config import DemoConfig
from flowtuner.demo.dataset import BACKGROUNDS, SHAPE_COLORS, SHAPES, caption

README = Path(__file__).resolve().parents[1] / "README.md"
# The default recipe with fewer sampling steps and two images per prompt (measured: docs/sdxl.md "Demo").
REDUCED = ["--family", "sdxl", "--sample_steps", "12", "--samples_per_prompt", "2"]


def _captions() -> list[str]:
    return [caption(c, s, b) for c in SHAPE_COLORS for s in SHAPES for b in BACKGROUNDS]


def test_demo_vocabulary_is_a_clip_tokenizer_with_one_token_per_word(tmp_path):
    """The family's own loader accepts it (49408 ids, start / end at 49406 / 49407) and every demo word is one
    token, as in the real CLIP vocabulary; other text still tokenizes (byte fallback)."""
    from flowtuner.demo.sdxl import build_clip_tokenizer
    from flowtuner.families.sdxl.tokenizer import load_tokenizer

    tok = load_tokenizer(build_clip_tokenizer(tmp_path / "tok", _captions()))
    words = sorted({w for c in _captions() for w in c.split()})
    for word in words:
        ids = tok(word, add_special_tokens=False)["input_ids"]
        assert tok.convert_ids_to_tokens(ids) == [word + "</w>"], word
    ids = tok("a red circle", add_special_tokens=True)["input_ids"]
    assert ids[0] == 49406 and ids[-1] == 49407 and len(ids) == 5
    assert tok("Purple zebra, 42!", add_special_tokens=False)["input_ids"]


def test_real_clip_tokenizer_reads_the_demo_words_as_single_tokens_too(tmp_path):
    """The demo's vocabulary segments its prompts as the real one does (the same token count and positions), so a
    run with --tokenizer on the real files differs only in which embedding rows the words pick."""
    from tests.shared import shared_path

    from flowtuner.families.sdxl.tokenizer import load_tokenizer

    real = load_tokenizer(shared_path("fixtures/tokenizers/clip"))
    for text in sorted(set(_captions()))[:12]:
        assert len(real(text, add_special_tokens=False)["input_ids"]) == len(text.split()), text


def test_folded_vae_keeps_its_reconstructions_and_gives_unit_latents_at_sdxl_scale():
    """fold_latent_scale: decode(encode(x)) unchanged, latents x 0.13025 of mean 0 and std 1 per channel (what
    every SDXL loader assumes), the posterior's std moved with its mean."""
    from diffusers import AutoencoderKL

    from flowtuner.demo.sdxl import SDXL_SCALE, VAE, fold_latent_scale

    torch.manual_seed(0)
    vae = AutoencoderKL(**VAE, scaling_factor=SDXL_SCALE).eval()
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        before = vae.encode(x).latent_dist
        recon = vae.decode(before.mode()).sample
        fold_latent_scale(vae, before.mode())
        after = vae.encode(x).latent_dist
        z = after.mode() * SDXL_SCALE
        assert torch.allclose(vae.decode(after.mode()).sample, recon, atol=1e-4)
    assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-4)
    assert torch.allclose(z.std(dim=(0, 2, 3)), torch.ones(4), atol=1e-4)
    ratio = (after.std / before.std) * SDXL_SCALE * before.mode().std(dim=(0, 2, 3))[None, :, None, None]
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-3)


def test_refitted_output_layer_is_the_least_squares_optimum_on_whole_images():
    """refit_output_layer: after it, the reconstruction MSE on the images it was given has no gradient left in the
    decoder's last convolution (weights and bias), and is below the trained layer's."""
    from diffusers import AutoencoderKL

    from flowtuner.demo.sdxl import SDXL_SCALE, VAE, refit_output_layer

    torch.manual_seed(0)
    vae = AutoencoderKL(**VAE, scaling_factor=SDXL_SCALE).eval()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    x[:, :, 8:20, 8:20] = torch.tensor([0.8, -0.7, -0.7])[:, None, None]  # a flat square, as the demo draws

    def loss_and_grad():
        vae.zero_grad()
        loss = torch.nn.functional.mse_loss(vae.decode(vae.encode(x).latent_dist.mode()).sample, x)
        loss.backward()
        conv = vae.decoder.conv_out
        return loss.item(), torch.cat([conv.weight.grad.flatten(), conv.bias.grad]).abs().max().item()

    before, grad_before = loss_and_grad()
    refit_output_layer(vae, x, ridge=0.0)
    after, grad_after = loss_and_grad()
    assert after < before and grad_after < 1e-4 * grad_before, (before, after, grad_before, grad_after)


@pytest.mark.parametrize("argv, line", [
    (["--family", "sdxl", "--eps_steps", "0"], "--eps_steps 0: must be at least 1."),
    (["--family", "sdxl", "--flow_shift", "-1"], "--flow_shift -1.0: must be positive."),
    (["--flow_shift", "6"], "--flow_shift: applies to --family sdxl only."),
    (["--family", "sdxl", "--edit"], "--edit: the edit demo is Qwen-Image-Edit's; drop --edit or --family sdxl."),
])
def test_bad_flags_are_one_line(tmp_path, capsys, argv, line):
    assert main(["demo", "--output_dir", str(tmp_path / "d"), *argv]) == 2
    assert capsys.readouterr().err.strip() == f"flowtuner demo: error: {line}"
    assert not (tmp_path / "d").exists()


def test_family_defaults_fill_only_unset_flags():
    assert DemoConfig().check().train_steps == 1500 and DemoConfig().check().eps_steps is None
    sdxl = DemoConfig(family="sdxl", learning_rate=5e-4).check()
    assert (sdxl.train_steps, sdxl.eps_steps, sdxl.learning_rate) == (500, 300, 5e-4)


def test_readme_lists_every_demo_flag():
    table = README.read_text().split("| flag | default | meaning |", 1)[1].split("\n\n", 1)[0]
    listed = set(re.findall(r"^\| `--(\w+)`", table, flags=re.M))
    assert listed == {f.name for f in dataclasses.fields(DemoConfig)}


def _sdxl_files(out: Path) -> None:
    from flowtuner.families.sdxl.checkpoint import find_component

    flow = out / "flow" / "sdxl_flow.safetensors"
    for component in ("unet", "vae", "clip_l", "clip_g"):  # what ComfyUI's checkpoint loader reads
        find_component(flow, component)
    for name in ("samples_grid.png", "samples_eps_grid.png", "flow/loss.png", "eps/loss.png", "summary.txt",
                 "models/tokenizer/vocab.json"):
        assert (out / name).exists(), name


@pytest.mark.slow
def test_few_step_run_writes_every_file_and_exits_1(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--family", "sdxl", "--output_dir", str(out), "--vae_steps", "2", "--eps_steps", "2",
               "--train_steps", "2", "--sample_steps", "2", "--samples_per_prompt", "1"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 12 and summary["eps"]["images"] == 12 and not summary["passed"] and rc == 1
    assert summary["config"]["family"] == "sdxl" and summary["config"]["train_steps"] == 2
    _sdxl_files(out)
    assert set(summary["stage_seconds"]) >= {"VAE training", "cache latents", "cache text", "train eps", "sample eps",
                                             "train flow", "sample flow"}
    assert "flowtuner demo --family sdxl: the eps model" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.demo  # deselected by default (pyproject addopts): python -m pytest -m demo
def test_reduced_sdxl_demo_reaches_the_colour_goal(tmp_path):
    """The whole default recipe (every stage's steps as shipped), only sampled with fewer steps and images: the
    part that could lose the goal is trained exactly as users get it (docs/sdxl.md "Demo" has its time)."""
    out = tmp_path / "demo"
    rc = main(["demo", "--output_dir", str(out), *REDUCED])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 12 * 2
    assert summary["accuracy"] >= 0.8, f"{summary['correct']}/{summary['images']}: {summary['grid']}"
    assert rc == 0
    _sdxl_files(out)
