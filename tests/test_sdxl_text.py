"""SDXL text encoding against the peers: tokenization, weights and 75-token chunks equal ComfyUI's own
SDXLTokenizer; conditioning and pooled vectors equal ComfyUI's SDXLClipModel (built tiny, loaded with the same
weights) with and without weights; short prompts equal diffusers' StableDiffusionXLPipeline.encode_prompt,
longer ones the bigASP recipe's chunking (diffusers truncates at 77 instead). Real CLIP tokenizer files."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from flowtuner.errors import FlowtunerError
from flowtuner.families.sdxl.text import CHUNK_TOKENS, PAD_IDS, PromptTokenizer, SdxlTextEncoder
from flowtuner.families.sdxl.tokenizer import load_tokenizer
from tests.sdxl_models import TINY_CLIP_G, TINY_CLIP_L, tiny_clip_g, tiny_clip_l, tiny_unet, tiny_vae
from tests.shared import shared_path

WORDS = ("cat dog red blue green house tree sky sun moon river stone light dark small big old new water fire "
         "wood glass metal cloud road city hill field flower bird").split()


@pytest.fixture(scope="module")
def clip_dir() -> Path:
    return shared_path("fixtures/tokenizers/clip/vocab.json").parent


@pytest.fixture(scope="module")
def clip_tok(clip_dir):
    return load_tokenizer(clip_dir)


def words(n: int) -> str:
    """n words of one token each (checked in test_word_prompts_have_the_token_counts_named)."""
    return " ".join(WORDS[i % len(WORDS)] for i in range(n))


PROMPTS = {
    "short": "a photo of a cat",
    "empty": "",
    "75 tokens": words(75),
    "76 tokens": words(76),
    "200 tokens": words(200),
    "nested weights": "a ((red)) (cat:1.3) with (blue (eyes:0.7)) and (((tiny))) ((x:abc)) (bad:)",
    "escaped": "a \\(not weighted\\) sign, \\((weighted)\\), [square brackets] stay text",
    "unbalanced": "a (unclosed group and a stray) paren (ok:0.9)",
    "embedding": "embedding:foo, a dog embedding: text\nembedding:bar.pt",
    "small group at a chunk edge": words(74) + " (red dog:1.2) " + words(10),
    "long group split": "(" + words(90) + ":0.8) and (small things:1.2) " + words(100),
}


def test_word_prompts_have_the_token_counts_named(clip_tok):
    for n in (75, 76, 200):
        assert len(clip_tok(words(n), add_special_tokens=False)["input_ids"]) == n


# --- tokenizer lookup ---------------------------------------------------------------------------------------


def test_explicit_folder_loads_and_a_wrong_one_is_one_line(clip_dir, tmp_path):
    assert len(load_tokenizer(clip_dir)) == 49408
    with pytest.raises(FlowtunerError, match="--tokenizer .*vocab.json and merges.txt") as err:
        load_tokenizer(tmp_path)
    assert "\n" not in str(err.value)


def test_found_beside_a_diffusers_folder_and_in_a_comfyui_install(clip_dir, tmp_path):
    repo = tmp_path / "sdxl"
    (repo / "unet").mkdir(parents=True)
    shutil.copytree(clip_dir, repo / "tokenizer_2")
    assert len(load_tokenizer(None, [repo / "unet" / "model.safetensors"])) == 49408
    comfy = tmp_path / "ComfyUI"
    shutil.copytree(clip_dir, comfy / "comfy" / "sd1_tokenizer")
    assert len(load_tokenizer(None, [tmp_path / "elsewhere.safetensors"], comfy)) == 49408


def test_found_in_the_hugging_face_cache(clip_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    snapshot = tmp_path / "models--openai--clip-vit-large-patch14" / "snapshots" / "abc123"
    shutil.copytree(clip_dir, snapshot)
    (tmp_path / "models--openai--clip-vit-large-patch14" / "refs").mkdir()
    (tmp_path / "models--openai--clip-vit-large-patch14" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    assert len(load_tokenizer(None, [])) == 49408


def test_nothing_found_says_what_to_pass_in_one_line(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    with pytest.raises(FlowtunerError) as err:
        load_tokenizer(None, [tmp_path / "model.safetensors"], tmp_path / "ComfyUI")
    message = str(err.value)
    assert "\n" not in message and "--tokenizer DIR" in message and "openai/clip-vit-large-patch14" in message
    assert str(tmp_path / "tokenizer") in message and "sd1_tokenizer" in message


def test_pad_ids_are_the_peers(comfy, clip_dir):
    """CLIP-L pads with the end token, bigG with id 0: ComfyUI's SDXL tokenizers and models, and diffusers'
    tokenizer_2 (pad "!")."""
    import comfy.sdxl_clip
    from transformers import CLIPTokenizer

    tok = comfy.sdxl_clip.SDXLTokenizer()
    assert (tok.clip_l.pad_token, tok.clip_g.pad_token) == (PAD_IDS["clip_l"], PAD_IDS["clip_g"])
    assert CLIPTokenizer.from_pretrained(str(clip_dir), pad_token="!").pad_token_id == PAD_IDS["clip_g"]
    assert CLIPTokenizer.from_pretrained(str(clip_dir)).pad_token_id == PAD_IDS["clip_l"]


# --- tokenization, weights, chunks vs ComfyUI -----------------------------------------------------------------


@pytest.mark.parametrize("name", list(PROMPTS))
def test_tokens_weights_and_chunks_equal_comfyui(comfy, clip_tok, name):
    import comfy.sdxl_clip

    prompt = PROMPTS[name]
    theirs = comfy.sdxl_clip.SDXLTokenizer().tokenize_with_weights(prompt)
    ours = PromptTokenizer(clip_tok, max_chunks=None).tokenize(prompt)
    weights = [[1.0] + [w for _, w in c] + [1.0] * (CHUNK_TOKENS + 1 - len(c)) for c in ours.chunks]
    for key, encoder in (("l", "clip_l"), ("g", "clip_g")):
        assert ours.ids(PAD_IDS[encoder]).tolist() == [[t for t, _ in chunk] for chunk in theirs[key]]
        assert weights == [[w for _, w in chunk] for chunk in theirs[key]]
    if name == "200 tokens":
        assert len(ours.chunks) == 3


def test_unweighted_reads_parentheses_as_text_like_comfyuis_disable_weights(comfy, clip_tok):
    import comfy.sdxl_clip

    prompt = PROMPTS["nested weights"] + " " + PROMPTS["escaped"]
    theirs = comfy.sdxl_clip.SDXLTokenizer().tokenize_with_weights(prompt, disable_weights=True)
    ours = PromptTokenizer(clip_tok, weighted=False).tokenize(prompt)
    assert not ours.weighted
    assert ours.ids(PAD_IDS["clip_g"]).tolist() == [[t for t, _ in chunk] for chunk in theirs["g"]]


def test_chunk_counts_buckets_and_the_three_chunk_limit(clip_tok, caplog):
    tokens = PromptTokenizer(clip_tok)
    assert [tokens.chunk_count(words(n)) for n in (0, 1, 75, 76, 150, 151, 225, 226, 400)] == [1, 1, 1, 2, 2, 3, 3, 3, 3]
    with caplog.at_level(logging.WARNING, logger="flowtuner.families.sdxl.text"):
        cut = tokens.tokenize(words(300))
    assert len(cut.chunks) == 3 and cut.dropped_tokens == 75
    assert any("75 tokens dropped" in r.getMessage() for r in caplog.records)
    padded = tokens.tokenize("a cat", chunks=3)  # a 3-chunk bucket: empty chunks after the prompt's
    ids = padded.ids(PAD_IDS["clip_g"])
    assert ids.shape == (3, 77) and ids[1].tolist() == [49406, 49407] + [0] * 75 and ids[2].equal(ids[1])
    assert len(PromptTokenizer(clip_tok, max_chunks=None).tokenize(words(300)).chunks) == 4  # ComfyUI's "no limit"


# --- encodings -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoders():
    """CLIP-L and a bigG whose projection is square, as the real one (1280 -> 1280): ComfyUI builds it square."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(5)
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**{**TINY_CLIP_G, "projection_dim": TINY_CLIP_G["hidden_size"]}))
    return tiny_clip_l(4), clip_g.eval()


def _comfy_keys(state: dict) -> dict:
    """transformers 5 keeps CLIPTextModel's weights without the `text_model.` prefix the files (and ComfyUI) use."""
    return {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v for k, v in state.items()}


@pytest.fixture(scope="module")
def comfy_model(comfy, encoders):
    import comfy.sdxl_clip

    config = {"clip_l_model_config": dict(TINY_CLIP_L), "clip_g_model_config": dict(TINY_CLIP_G)}
    model = comfy.sdxl_clip.SDXLClipModel(device="cpu", dtype=torch.float32, model_options=config)
    clip_l, clip_g = encoders
    for theirs, ours in ((model.clip_l, clip_l), (model.clip_g, clip_g)):
        result = theirs.load_sd(_comfy_keys(ours.state_dict()))
        assert not [k for k in result.missing_keys if k.startswith("text_model.")]
    return model


@pytest.mark.parametrize("name", ["short", "nested weights", "small group at a chunk edge", "long group split"])
def test_conditioning_and_pooled_equal_comfyui(comfy, comfy_model, encoders, clip_tok, name):
    import comfy.sdxl_clip

    prompt = PROMPTS[name]
    cond, pooled = comfy_model.encode_token_weights(comfy.sdxl_clip.SDXLTokenizer().tokenize_with_weights(prompt))
    ours = SdxlTextEncoder(*encoders, clip_tok).encode([prompt])[0]
    width = TINY_CLIP_L["hidden_size"] + TINY_CLIP_G["hidden_size"]
    assert ours.embeds.shape == cond.shape and cond.shape[1] % 77 == 0 and cond.shape[2] == width
    torch.testing.assert_close(ours.embeds, cond, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ours.extra["pooled"], pooled, atol=2e-5, rtol=1e-5)


def test_weights_change_only_the_weighted_tokens(encoders, clip_tok):
    encoder = SdxlTextEncoder(*encoders, clip_tok)
    plain, weighted = (encoder.encode([p])[0] for p in ("a red cat", "a (red:1.5) cat"))
    changed = (plain.embeds - weighted.embeds).abs().amax(-1)[0] > 1e-6
    assert changed.nonzero().flatten().tolist() == [2]  # BOS, "a", "red": only "red" moves
    torch.testing.assert_close(plain.extra["pooled"], weighted.extra["pooled"])


@pytest.fixture(scope="module")
def diffusers_pipe(clip_dir):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(clip_dir), model_max_length=77)
    tok_2 = CLIPTokenizer.from_pretrained(str(clip_dir), model_max_length=77, pad_token="!")
    return StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=tiny_clip_l(), text_encoder_2=tiny_clip_g(),
                                     tokenizer=tok, tokenizer_2=tok_2, unet=tiny_unet(), scheduler=EulerDiscreteScheduler())


def _recipe_chunks(tokenizer, prompt: str, pad: int) -> torch.Tensor:
    """The bigASP recipe's chunk_tokens: whole-prompt tokens, cut every 75, BOS/EOS per chunk, pad."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    rows = [ids[i : i + CHUNK_TOKENS] for i in range(0, max(len(ids), 1), CHUNK_TOKENS)]
    return torch.tensor([[49406] + r + [49407] + [pad] * (CHUNK_TOKENS - len(r)) for r in rows])


@pytest.mark.parametrize("n_words", [12, 75, 140, 220])
def test_diffusers_encode_prompt_and_the_recipe_chunks(diffusers_pipe, clip_tok, n_words):
    """1 chunk: equal to diffusers' encode_prompt. 2-3 chunks: the first chunk and the pooled vector equal
    diffusers' (which truncates there), every chunk equals the recipe's chunk encoding."""
    pipe, prompt = diffusers_pipe, words(n_words)
    embeds, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    ours = SdxlTextEncoder(pipe.text_encoder, pipe.text_encoder_2, clip_tok).encode([prompt])[0]
    chunks = -(-n_words // CHUNK_TOKENS)
    assert ours.embeds.shape == (1, 77 * chunks, embeds.shape[-1]) and embeds.shape[1] == 77
    torch.testing.assert_close(ours.embeds[:, :77], embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.extra["pooled"], pooled, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        recipe = [enc(_recipe_chunks(clip_tok, prompt, PAD_IDS[name]), output_hidden_states=True).hidden_states[-2]
                  for enc, name in ((pipe.text_encoder, "clip_l"), (pipe.text_encoder_2, "clip_g"))]
    torch.testing.assert_close(ours.embeds, torch.cat(recipe, -1).reshape(1, -1, embeds.shape[-1]), atol=1e-5, rtol=1e-5)


def test_a_fixed_chunk_count_pads_with_empty_chunks(diffusers_pipe, clip_tok):
    pipe = diffusers_pipe
    encoder = SdxlTextEncoder(pipe.text_encoder, pipe.text_encoder_2, clip_tok)
    one, three = encoder.encode(["a cat"])[0], encoder.encode(["a cat"], chunks=3)[0]
    empty = encoder.encode([""])[0]
    assert three.embeds.shape[1] == 3 * 77
    torch.testing.assert_close(three.embeds[:, :77], one.embeds)
    torch.testing.assert_close(three.embeds[:, 77:154], empty.embeds)
    torch.testing.assert_close(three.extra["pooled"], one.extra["pooled"])
