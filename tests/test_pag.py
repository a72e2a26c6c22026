"""Perturbed-attention guidance on the Qwen-Image DiT: the identity self-attention processor, the block
selection, the hook's formula, and its cost of one extra forward per step."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

from flowtuner.errors import ConfigError
from flowtuner.families.qwen_image.pag import IdentitySelfAttention, identity_self_attention, parse_blocks
from flowtuner.families.qwen_image.tiny import tiny_dit
from flowtuner.guidance.methods import METHODS, Step


@pytest.fixture(scope="module")
def block_inputs():
    dit = tiny_dit(seed=3, layers=3)
    attn = dit.transformer_blocks[1].attn
    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, 12, attn.inner_dim, generator=g)
    txt = torch.randn(2, 5, attn.inner_dim, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    rope = dit.pos_embed([[(1, 3, 4)], [(1, 3, 4)]], max_txt_seq_len=5, device=img.device)
    return dit, attn, img, txt, mask, rope


def _run(attn, processor, img, txt, mask, rope):
    with torch.no_grad():
        return processor(attn, img, txt, encoder_hidden_states_mask=mask, image_rotary_emb=rope)


def test_text_rows_are_untouched(block_inputs):
    """Text queries attend as in diffusers' processor: this also checks the projections, QK norms, RoPE
    and padding mask of the perturbed processor against diffusers'."""
    _, attn, img, txt, mask, rope = block_inputs
    _, txt_ref = _run(attn, QwenDoubleStreamAttnProcessor2_0(), img, txt, mask, rope)
    img_pag, txt_pag = _run(attn, IdentitySelfAttention(), img, txt, mask, rope)
    torch.testing.assert_close(txt_pag, txt_ref, atol=1e-5, rtol=1e-5)
    img_ref, _ = _run(attn, QwenDoubleStreamAttnProcessor2_0(), img, txt, mask, rope)
    assert (img_pag - img_ref).abs().max() > 1e-2  # the image rows are perturbed


def test_image_rows_see_only_themselves_among_image_tokens(block_inputs):
    _, attn, img, txt, mask, rope = block_inputs
    changed = img.clone()
    changed[:, 7] += 3.0
    a, _ = _run(attn, IdentitySelfAttention(), img, txt, mask, rope)
    b, _ = _run(attn, IdentitySelfAttention(), changed, txt, mask, rope)
    others = [i for i in range(12) if i != 7]
    torch.testing.assert_close(a[:, others], b[:, others], atol=1e-6, rtol=0)
    assert (a[:, 7] - b[:, 7]).abs().max() > 1e-3
    c, _ = _run(attn, QwenDoubleStreamAttnProcessor2_0(), img, txt, mask, rope)  # the stock map mixes tokens
    d, _ = _run(attn, QwenDoubleStreamAttnProcessor2_0(), changed, txt, mask, rope)
    assert (c[:, others] - d[:, others]).abs().max() > 1e-3


def test_identity_on_values_when_no_text_is_visible(block_inputs):
    _, attn, img, txt, _, rope = block_inputs
    none = torch.zeros(2, 5, dtype=torch.bool)
    out, _ = _run(attn, IdentitySelfAttention(), img, txt, none, rope)
    torch.testing.assert_close(out, attn.to_out[0](attn.to_v(img)).detach(), atol=1e-5, rtol=1e-5)


def test_blocks_and_restore(block_inputs):
    dit = block_inputs[0]
    assert parse_blocks("middle", 60) == [30] and parse_blocks("20-23", 60) == [20, 21, 22, 23]
    assert parse_blocks("5+20-21", 60) == [5, 20, 21] and parse_blocks(3.0, 60) == [3]
    for bad in ("70", "x", "3-"):
        with pytest.raises(ConfigError, match="blocks"):
            parse_blocks(bad, 60)
    before = [type(b.attn.processor) for b in dit.transformer_blocks]
    with pytest.raises(RuntimeError):
        with identity_self_attention(dit, "0+2"):
            assert [type(b.attn.processor) for b in dit.transformer_blocks] == [IdentitySelfAttention, before[1], IdentitySelfAttention]
            raise RuntimeError
    assert [type(b.attn.processor) for b in dit.transformer_blocks] == before


def test_pag_formula():
    g = torch.Generator().manual_seed(1)
    x, dc, du, d_pag = (torch.randn(1, 16, 4, 4, generator=g) for _ in range(4))
    seen = []
    step = Step(x, 0.5, 4.0, dc, du, perturbed=lambda blocks: seen.append(blocks) or d_pag)
    d = torch.randn(1, 16, 4, 4, generator=g)
    m = METHODS["pag"]
    out = m.fn(step, d, {**m.defaults, "scale": 2.5, "blocks": "20-23"}, {})
    torch.testing.assert_close(out, d + 2.5 * (dc - d_pag))
    assert seen == ["20-23"]
    assert m.fn(step, d, {**m.defaults, "scale": 0.0}, {}) is d and seen == ["20-23"]  # scale 0: no extra pass


@pytest.mark.slow
@pytest.mark.parametrize("cfg,calls_per_step", [(4.0, 3), (1.0, 2)])
def test_pag_costs_one_forward_per_step(tmp_path, tiny_files, monkeypatch, cfg, calls_per_step):
    from safetensors.torch import load_file

    from flowtuner.cli import main
    from flowtuner.families.qwen_image.family import QwenImageDenoiser

    calls = []
    original = QwenImageDenoiser.predict
    monkeypatch.setattr(QwenImageDenoiser, "predict", lambda self, *a: calls.append(1) or original(self, *a))
    base = ["generate", "--model", str(tiny_files["repo"]), "--device", "cpu", "--image_size", "64", "64",
            "--infer_steps", "3", "--seed", "2", "--prompt", "x", "--output_type", "latent", "--guidance_scale", str(cfg)]
    assert main(base + ["--save_path", str(tmp_path / "a")]) == 0
    plain_calls = len(calls)
    calls.clear()
    assert main(base + ["--save_path", str(tmp_path / "b"), "--guidance", "pag:scale=3,blocks=0-1"]) == 0
    assert len(calls) == 3 * calls_per_step and plain_calls == 3 * (calls_per_step - 1)
    assert main(base + ["--save_path", str(tmp_path / "c"), "--guidance", "pag:scale=0"]) == 0
    a, b, c = (load_file(next((tmp_path / n).glob("*.safetensors")))["latent"] for n in "abc")
    assert (a - b).abs().max() > 1e-3
    torch.testing.assert_close(c, a, atol=1e-4, rtol=0)  # scale 0 is the unguided result
