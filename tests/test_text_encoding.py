"""Prompt template, token cut, truncation and batching of the Qwen-Image text encoder."""

from __future__ import annotations

import logging

import pytest
import torch

from flowtuner.families.qwen_image.text_encoder import MAX_PROMPT_TOKENS, QwenTextEncoder, load_text_model, prompt_start
from tests.reference import reference_pipeline

SUFFIX = [151645, 198, 151644, 77091, 198]  # <|im_end|>\n<|im_start|>assistant\n


def test_real_tokenizer_drops_34_template_tokens_and_keeps_5(qwen_tokenizer):
    enc = QwenTextEncoder(model=None, tokenizer=qwen_tokenizer)
    (ids, cut), (empty_ids, empty_cut) = enc.tokenize(["a cat", ""])
    assert cut == 34 and empty_cut == 34
    assert len(ids) == 41 and len(ids) - cut == 7
    assert ids[-5:] == SUFFIX
    assert empty_ids[cut:] == SUFFIX


def test_cut_is_found_from_tokens_not_fixed():
    im_start, user_nl = 9, [5, 6]
    assert prompt_start([9, 1, 2, 9, 5, 6, 7], im_start, user_nl) == 6
    assert prompt_start([3, 9, 1, 9, 7], im_start, user_nl) == 4  # no "user\n" after the second turn
    with pytest.raises(ValueError):
        prompt_start([1, 2, 3], im_start, user_nl)


def test_long_prompt_is_truncated_with_warning(qwen_tokenizer, caplog):
    enc = QwenTextEncoder(model=None, tokenizer=qwen_tokenizer)
    with caplog.at_level(logging.WARNING):
        ((ids, cut),) = enc.tokenize(["word " * 1500])
    assert len(ids) - cut == MAX_PROMPT_TOKENS
    assert "keeping the first 1024" in caplog.text


@pytest.fixture(scope="module")
def encoder(tiny_files, qwen_tokenizer):
    return QwenTextEncoder(load_text_model(tiny_files["repo"] / "text_encoder"), qwen_tokenizer)


def test_embeddings_equal_diffusers_and_batching_is_exact(encoder, tiny_models, qwen_tokenizer):
    prompts = ["a red circle", "a much longer prompt about a small green square on a yellow background", ""]
    pipe = reference_pipeline(tiny_models, qwen_tokenizer)
    ref, ref_mask = pipe._get_qwen_prompt_embeds(prompts, device=torch.device("cpu"), dtype=torch.float32)
    batched = encoder.encode(prompts)
    for i, cond in enumerate(batched):
        n = int(ref_mask[i].sum())
        assert cond.embeds.shape == (1, n, 128)
        torch.testing.assert_close(cond.embeds[0], ref[i, :n], atol=1e-5, rtol=0)
        alone = encoder.encode([prompts[i]])[0].embeds
        torch.testing.assert_close(alone, cond.embeds, atol=1e-5, rtol=0)
    assert cond.embeds.abs().mean() > 0.1  # post-norm hidden states, not zeros


def test_repeated_prompts_are_encoded_once(monkeypatch):
    from flowtuner import generate
    from flowtuner.families.base import Conditioning

    seen = []

    class Counting:
        def encode(self, prompts, images=None):
            assert images is None
            seen.extend(prompts)
            return [Conditioning(torch.zeros(1, 1, 4)) for _ in prompts]

    class Fam:
        def load_text_encoder(self, paths, device):
            assert device == torch.device("cpu")
            return Counting()

    jobs = [generate.Job(prompt="a", negative_prompt=" ", height=64, width=64, steps=2, guidance_scale=4.0, seed=0), generate.Job(prompt="a", negative_prompt=" ", height=64, width=64, steps=2, guidance_scale=4.0, seed=1),
            generate.Job(prompt="b", negative_prompt="x", height=64, width=64, steps=2, guidance_scale=1.0, seed=0)]
    conds = generate.encode_prompts(Fam(), None, jobs, torch.device("cpu"))
    assert sorted(seen) == [" ", "a", "b"]  # "x" is unused at guidance 1.0
    assert set(conds) == {("a", (), ()), (" ", (), ()), ("b", (), ())}
