"""Qwen2.5-VL text encoder for Qwen-Image: load the language model from any key layout, apply the
prompt template, cut the template prefix at the point found from the tokens, return the final
post-norm hidden states."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

from flowtuner.errors import ConfigError, WeightsError
from flowtuner.families.base import Conditioning, TextEncoder
from flowtuner.families.identify import describe
from flowtuner.weights.materialize import assign_weights, build_empty, check_supported_quantisation, storage_dtype
from flowtuner.weights.fp8 import convert_linears, fp8_text_requested, stream_fp8
from flowtuner.weights.reader import Checkpoint, open_checkpoint

log = logging.getLogger(__name__)

T2I_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
MAX_PROMPT_TOKENS = 1024
# Where the language-model weights sit, per layout: new transformers (>= 4.52), legacy HF / ComfyUI
# split files, and ComfyUI all-in-one checkpoints (legacy keys under a prefix).
LM_PREFIXES = ("model.language_model.", "model.", "text_encoders.qwen25_7b.transformer.model.")
LM_PROBE = "layers.0.self_attn.k_proj.bias"
# Every Qwen2.5(-VL) size uses 128-dim heads, M-RoPE sections [16, 24, 24] and theta 1e6.
HEAD_DIM = 128
QWEN25_TEXT_DEFAULTS = dict(
    hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=128000, use_sliding_window=False,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=False,
)


def infer_text_config(lm: Checkpoint) -> Qwen2_5_VLTextConfig:
    vocab, hidden = lm.shape("embed_tokens.weight")
    layers = len({k.split(".")[1] for k in lm.keys() if k.startswith("layers.")})
    if hidden % HEAD_DIM:
        raise WeightsError(f"{lm.path}: hidden size {hidden} is not a Qwen2.5 size; put its config.json beside it.")
    return Qwen2_5_VLTextConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
        intermediate_size=lm.shape("layers.0.mlp.gate_proj.weight")[0],
        num_attention_heads=hidden // HEAD_DIM,
        num_key_value_heads=lm.shape("layers.0.self_attn.k_proj.weight")[0] // HEAD_DIM,
        **QWEN25_TEXT_DEFAULTS,
    )


def _config_json(path: Path) -> Qwen2_5_VLTextConfig | None:
    file = (path if path.is_dir() else path.parent) / "config.json"
    if not file.exists():
        return None
    raw = json.loads(file.read_text())
    if raw.get("model_type") != "qwen2_5_vl":
        return None
    return Qwen2_5_VLConfig(**raw).text_config


def language_model_view(ckpt: Checkpoint) -> Checkpoint:
    check_supported_quantisation(ckpt)
    for prefix in LM_PREFIXES:
        if prefix + LM_PROBE in ckpt:
            return ckpt.select(prefix)
    raise WeightsError(f"{ckpt.path}: expected a Qwen2.5-VL text encoder, but this looks like {describe(ckpt)}.")


def load_text_model(path: str | Path, device: torch.device | str = "cpu") -> Qwen2_5_VLTextModel:
    """The language model only: the vision tower and lm_head are not needed for text-to-image."""
    ckpt = open_checkpoint(path)
    lm = language_model_view(ckpt)
    config = _config_json(ckpt.path) or infer_text_config(lm)
    config._attn_implementation = "sdpa"
    dtype = storage_dtype(lm, "embed_tokens.weight")
    model = build_empty(lambda: Qwen2_5_VLTextModel(config))
    keys = [k for k in lm.keys() if re.match(r"^(embed_tokens|layers|norm)\.", k)]
    targets = fp8_targets(model, "layers.")
    assign_weights(model, stream_fp8(lm, [(k, (k, dtype)) for k in keys], targets), ckpt)
    return model.to(device).eval().requires_grad_(False)


def fp8_targets(model: torch.nn.Module, layers: str) -> set[str]:
    """With --fp8_vl (the enclosing fp8_text_encoder context): the decoder layers' Linears, switched to fp8 storage
    (embeddings, norms and the vision tower keep the file's dtype, as musubi-tuner's --fp8_vl)."""
    if not fp8_text_requested():
        return set()
    targets = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(layers)}
    convert_linears(model, targets, {})
    return targets


def prompt_start(ids: list[int], im_start: int, user_newline: list[int]) -> int:
    """Index of the first prompt token: after the second `<|im_start|>` and its `user\\n`.

    Found from the tokens rather than a fixed 34, so any template (or tokenizer) stays correct."""
    starts = [i for i, t in enumerate(ids) if t == im_start]
    if len(starts) < 2:
        raise ValueError("the prompt template has no user turn")
    cut = starts[1] + 1
    if ids[cut: cut + len(user_newline)] == user_newline:
        cut += len(user_newline)
    return cut


class QwenTextEncoder(TextEncoder):
    def __init__(self, model: Qwen2_5_VLTextModel, tokenizer, template: str = T2I_TEMPLATE):
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
        self.user_newline = tokenizer("user\n", add_special_tokens=False)["input_ids"]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def tokenize(self, prompts: list[str]) -> list[tuple[list[int], int]]:
        """(token ids, cut index) per prompt; prompts over MAX_PROMPT_TOKENS are truncated with a warning."""
        out = []
        for prompt in prompts:
            ids = self.tokenizer(self.template.format(prompt), add_special_tokens=False)["input_ids"]
            cut = prompt_start(ids, self.im_start, self.user_newline)
            if len(ids) - cut > MAX_PROMPT_TOKENS:
                log.warning("prompt has %d tokens; keeping the first %d: %.60s...", len(ids) - cut, MAX_PROMPT_TOKENS, prompt)
                ids = ids[: cut + MAX_PROMPT_TOKENS]
            out.append((ids, cut))
        return out

    @torch.no_grad()
    def encode(self, prompts: list[str], images: list[list] | None = None) -> list[Conditioning]:
        if images and any(images):
            raise ConfigError("control images are for the Qwen-Image-Edit models (--model_version edit, edit-2509, "
                              "edit-2511); Qwen-Image reads text only.")
        tokens = self.tokenize(prompts)
        width = max(len(ids) for ids, _ in tokens)
        device = self.model.embed_tokens.weight.device
        input_ids = torch.full((len(tokens), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(tokens), width), dtype=torch.long)
        for i, (ids, _) in enumerate(tokens):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
        hidden = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        return [Conditioning(hidden[i : i + 1, cut : len(ids)].cpu()) for i, (ids, cut) in enumerate(tokens)]
