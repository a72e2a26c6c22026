"""Self-attention guidance (SAG) against ComfyUI's SelfAttentionGuidance node on ComfyUI's own UNet, built by its
loader from our tiny single file (the harness of tests/test_sdxl_guidance.py), and its pieces against hand-written
references: the 9-tap reflect-padded Gaussian blur, the attention mask, the recorded probabilities.

The latent is 16 x 24 (a 4 x 6 grid of 24 positions at the tiny UNet's mid block), so the mask's grid search must
find the rows from the aspect ratio, and most positions are neither all nor none blurred. Tolerance: the PAG test's."""

from __future__ import annotations

import math

import pytest
import torch

from flowtuner.errors import ConfigError
from flowtuner.families.sdxl.denoiser import SDXLDenoiser, parametrisation
from flowtuner.families.sdxl.family import SDXLFamily
from flowtuner.guidance.methods import attention_mask, gaussian_blur, parse_guidance
from flowtuner.sampling import Job, sample_job
from tests import sdxl_models as M
from tests import test_sdxl_guidance as harness
from tests.test_sdxl_guidance import assert_close, comfy_patcher, comfy_sd, conds, unet  # noqa: F401  (fixtures)

H, W = 128, 192


def run_comfy(patcher, conds, sampler, cfg, steps, seed=5):
    return harness.run_comfy(patcher, conds, sampler, "normal", cfg, steps, seed, size=(H, W))


def run_ours(unet, conds, sampler, cfg, steps, seed=5, **job):
    return harness.run_ours(unet, conds, "eps", sampler, "normal", cfg, steps, seed, size=(H, W), **job)


# ------------------------------------------------------------------------------------------------ the node
@pytest.mark.parametrize("sampler,cfg,scale,blur", [("euler", 3.0, 0.5, 2.0), ("dpmpp_2m", 3.0, 1.5, 1.0),
                                                     ("euler", 1.0, 0.8, 2.0)])
def test_sag_matches_comfyui_node(unet, conds, comfy_sd, sampler, cfg, scale, blur):
    """At CFG 1 ComfyUI still runs the uncond pass (SAG disables the cfg = 1 optimisation); so do we."""
    from comfy_extras.nodes_sag import SelfAttentionGuidance

    steps = 5
    patcher = SelfAttentionGuidance.execute(comfy_patcher(comfy_sd), scale, blur)[0]
    ref = run_comfy(patcher, conds, sampler, cfg, steps)
    ours = run_ours(unet, conds, sampler, cfg, steps, guidance=[f"sag:scale={scale},blur_sigma={blur}"])
    assert_close(ours, ref)
    plain = run_ours(unet, conds, sampler, cfg, steps)
    assert (plain - ref).abs().max() > 0.05  # SAG changed the result


def test_sag_leaves_other_passes_unrecorded_and_restores_attention(unet, conds):
    """Only the uncond pass records (one map per step); the site's processor comes back after the run."""
    from flowtuner.families.sdxl.patches import SAG_SITE, parse_blocks

    site = parse_blocks(SAG_SITE, unet)[0].attn1
    before = site.processor
    den = SDXLDenoiser(unet, parametrisation("eps"))
    calls = []
    record = den.record_self_attention

    def counting():
        calls.append(1)
        return record()

    den.record_self_attention = counting
    fam = SDXLFamily()
    fam.prediction_type = "eps"
    spec = Job(prompt="p", negative_prompt="n", height=H, width=W, steps=3, guidance_scale=2.0, seed=1,
               sampler="euler", scheduler="normal", cfg_mode="plain", guidance=["sag"])
    sample_job(den, fam, spec, conds)
    assert len(calls) == 3 and site.processor is before


# ------------------------------------------------------------------------------------------------ the pieces
def reference_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """9 x 9 Gaussian by loops over a hand-mirrored image (reflect: the edge pixel is not repeated)."""
    taps = [math.exp(-0.5 * (i / sigma) ** 2) for i in range(-4, 5)]
    taps = [t / sum(taps) for t in taps]
    h, w = img.shape[-2:]
    mirror = lambda i, n: -i if i < 0 else (2 * (n - 1) - i if i >= n else i)  # noqa: E731
    out = torch.zeros_like(img, dtype=torch.float64)
    for y in range(h):
        for x in range(w):
            for dy in range(-4, 5):
                for dx in range(-4, 5):
                    out[..., y, x] += taps[dy + 4] * taps[dx + 4] * img[..., mirror(y + dy, h), mirror(x + dx, w)].double()
    return out.to(img.dtype)


def test_gaussian_blur_against_a_hand_written_one():
    img = torch.randn(2, 3, 6, 7, generator=torch.Generator().manual_seed(0))
    for sigma in (0.7, 2.0):
        torch.testing.assert_close(gaussian_blur(img, sigma), reference_blur(img, sigma), atol=1e-6, rtol=1e-6)


def test_attention_mask_thresholds_column_sums_and_upsamples():
    """Key positions whose head-averaged column sum is > 1 (not >= 1) are masked, on a rows x cols grid found from
    the aspect ratio, nearest-upsampled to the latent."""
    batch, heads, rows, cols = 1, 2, 2, 4
    n = rows * cols
    probs = torch.full((batch * heads, n, n), 1.0 / n)  # every column sums to exactly 1 (binary fractions): no mask
    assert attention_mask(probs, batch, 4, 8).sum() == 0
    probs[:, :, 5] += 0.5 / n  # position 5 (row 1, col 1) attended more; position 0 less
    probs[:, :, 0] -= 0.5 / n
    mask = attention_mask(probs, batch, 4, 8)
    expected = torch.zeros(rows, cols)
    expected[1, 1] = 1
    torch.testing.assert_close(mask[0, 0], expected.repeat_interleave(2, 0).repeat_interleave(2, 1))


def test_recorded_probabilities_are_the_softmax_of_scaled_scores(unet):
    from flowtuner.families.sdxl.patches import SAG_SITE, RecordingAttention, parse_blocks

    attn = parse_blocks(SAG_SITE, unet)[0].attn1
    hidden = torch.randn(2, 24, attn.to_q.in_features, generator=torch.Generator().manual_seed(1))
    into = []
    with torch.no_grad():
        out = RecordingAttention(into)(attn, hidden)
        torch.testing.assert_close(out, attn(hidden), atol=1e-5, rtol=1e-5)  # the block's own attention
    d = attn.to_q.out_features // attn.heads
    q = attn.to_q(hidden).reshape(2, 24, attn.heads, d).transpose(1, 2).reshape(-1, 24, d)
    k = attn.to_k(hidden).reshape(2, 24, attn.heads, d).transpose(1, 2).reshape(-1, 24, d)
    torch.testing.assert_close(into[0], torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), -1).detach())


# ------------------------------------------------------------------------------------------------ refusals
def test_sag_options_and_refusals():
    assert parse_guidance("sag") == ("sag", {"scale": 0.5, "blur_sigma": 2.0})
    with pytest.raises(ConfigError, match=r"^--guidance sag: blur_sigma=0 must be > 0 "):
        parse_guidance("sag:blur_sigma=0")
    from flowtuner.families.qwen_image.family import QwenImageDenoiser

    qwen = QwenImageDenoiser.__new__(QwenImageDenoiser)  # no DiT needed to refuse
    with pytest.raises(ConfigError, match=r"^--guidance sag: .* QwenImageDenoiser has no UNet\. Drop it"):
        qwen.record_self_attention()


def test_sag_on_small_latents_returns_cfg():
    """Latent side <= 4: ComfyUI's early return (its reflect padding needs more), no extra pass."""
    from flowtuner.guidance.methods import METHODS, Step

    d = torch.randn(1, 4, 4, 8)
    step = Step(d, 1.0, 3.0, d, d, uncond_model=lambda x: pytest.fail("no extra pass"))
    assert METHODS["sag"].fn(step, d, METHODS["sag"].defaults, {}) is d


def test_sag_from_the_cli_at_cfg_1(tmp_path):
    """`generate --guidance sag` on an SDXL file at CFG 1: the negative prompt (' ' by default) is encoded and the uncond
    pass runs, so SAG changes the latents; a bad blur_sigma is a one-line error (exit 2)."""
    from safetensors.torch import load_file

    from flowtuner.cli import main
    from tests.shared import shared_path

    ckpt = M.write_single_file(tmp_path / "tiny.safetensors", *M.tiny_sdxl(0))
    base = ["generate", "--model_version", "sdxl", "--model", str(ckpt), "--tokenizer", str(shared_path("fixtures/tokenizers/clip")),
            "--prompt", "a red square", "--image_size", "64", "128", "--infer_steps", "2", "--guidance_scale", "1.0",
            "--seed", "5", "--device", "cpu", "--output_type", "latent"]
    assert main([*base, "--save_path", str(tmp_path / "plain")]) == 0
    assert main([*base, "--save_path", str(tmp_path / "sag"), "--guidance", "sag:scale=2"]) == 0
    plain, sag = (load_file(next((tmp_path / d).glob("*.safetensors")))["latent"] for d in ("plain", "sag"))
    assert torch.isfinite(sag).all() and (sag - plain).abs().max() > 1e-3
    assert main([*base, "--save_path", str(tmp_path / "bad"), "--guidance", "sag:blur_sigma=0"]) == 2
