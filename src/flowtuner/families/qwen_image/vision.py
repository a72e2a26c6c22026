"""The whole Qwen2.5-VL (language model + vision tower) for Qwen-Image-Edit, loaded from the same files
the text-to-image encoder reads: ComfyUI's `qwen_2.5_vl_7b.safetensors` (legacy keys, `visual.*`),
Hugging Face folders in both key layouts (`model.visual.*` since transformers 4.52, legacy `visual.*`)
and ComfyUI all-in-one checkpoints.

The model is transformers' own `Qwen2_5_VLModel`, so the vision attention, the window permutation
(undone before the merger: vision tokens come out in raster order) and the M-RoPE position ids of the
image tokens (`get_rope_index`) are transformers' code, not a copy.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

from flowtuner.errors import WeightsError
from flowtuner.families.qwen_image.text_encoder import fp8_targets, infer_text_config, language_model_view
from flowtuner.weights.fp8 import stream_fp8
from flowtuner.weights.materialize import assign_weights, build_empty, read_dequantized, storage_dtype
from flowtuner.weights.reader import Checkpoint, open_checkpoint

# Where the vision tower sits, per layout (same order of layouts as text_encoder.LM_PREFIXES).
VISION_PREFIXES = ("model.visual.", "visual.", "text_encoders.qwen25_7b.transformer.visual.")
VISION_PROBE = "patch_embed.proj.weight"
# Constants of every released Qwen2.5-VL vision tower (3B, 7B, 32B, 72B) that the weights do not show:
# 80-dim heads, a full-attention block closing every group of 8 (7, 15, 23, 31 at depth 32), 112-px
# windows. A shallower tower (tests) gets full attention in its last block too, as every released one has.
VISION_HEAD_DIM = 80
FULL_ATTENTION_EVERY = 8
VISION_DEFAULTS = dict(hidden_act="silu", window_size=112, tokens_per_second=2, initializer_range=0.02)


def vision_view(ckpt: Checkpoint) -> Checkpoint:
    for prefix in VISION_PREFIXES:
        if prefix + VISION_PROBE in ckpt:
            return ckpt.select(prefix)
    raise WeightsError(
        f"{ckpt.path}: has no vision tower (visual.* weights); Qwen-Image-Edit needs the full Qwen2.5-VL "
        "text encoder, e.g. ComfyUI's qwen_2.5_vl_7b.safetensors or the text_encoder/ folder of Qwen/Qwen-Image-Edit."
    )


def full_attention_blocks(depth: int) -> list[int]:
    return [i for i in range(depth) if i % FULL_ATTENTION_EVERY == FULL_ATTENTION_EVERY - 1 or i == depth - 1]


def infer_vision_config(visual: Checkpoint) -> dict:
    hidden, channels, temporal, patch, _ = visual.shape(VISION_PROBE)
    depth = len({k.split(".")[1] for k in visual.keys() if k.startswith("blocks.")})
    merge = math.isqrt(visual.shape("merger.mlp.0.weight")[1] // hidden)
    if hidden % VISION_HEAD_DIM or merge * merge * hidden != visual.shape("merger.mlp.0.weight")[1]:
        raise WeightsError(
            f"{visual.path}: vision tower of width {hidden} is not a Qwen2.5-VL size; put its config.json beside it."
        )
    return dict(
        depth=depth, hidden_size=hidden, num_heads=hidden // VISION_HEAD_DIM, in_channels=channels,
        patch_size=patch, temporal_patch_size=temporal, spatial_merge_size=merge,
        intermediate_size=visual.shape("blocks.0.mlp.gate_proj.weight")[0],
        out_hidden_size=visual.shape("merger.mlp.2.weight")[0],
        fullatt_block_indexes=full_attention_blocks(depth),
        **VISION_DEFAULTS,
    )


def _config_json(path: Path) -> Qwen2_5_VLConfig | None:
    file = (path if path.is_dir() else path.parent) / "config.json"
    if not file.exists():
        return None
    raw = json.loads(file.read_text())
    return Qwen2_5_VLConfig(**raw) if raw.get("model_type") == "qwen2_5_vl" else None


def vl_config(ckpt: Checkpoint, lm: Checkpoint, visual: Checkpoint) -> Qwen2_5_VLConfig:
    """config.json beside the weights when there is one, else inferred from the tensor shapes."""
    config = _config_json(ckpt.path)
    if config is None:
        text = infer_text_config(lm)
        config = Qwen2_5_VLConfig(text_config=text.to_dict(), vision_config=infer_vision_config(visual))
    if config.vision_config.out_hidden_size != config.text_config.hidden_size:
        raise WeightsError(
            f"{ckpt.path}: the vision tower outputs {config.vision_config.out_hidden_size} features but the language "
            f"model is {config.text_config.hidden_size} wide; the file mixes two models."
        )
    for c in (config, config.text_config, config.vision_config):
        c._attn_implementation = "sdpa"
    return config


def load_vl_model(path: str | Path, device: torch.device | str = "cpu") -> Qwen2_5_VLModel:
    """Language model + vision tower (no lm_head: only hidden states are used)."""
    ckpt = open_checkpoint(path)
    lm = language_model_view(ckpt)
    visual = vision_view(ckpt)
    config = vl_config(ckpt, lm, visual)
    dtype = storage_dtype(lm, "embed_tokens.weight")
    model = build_empty(lambda: Qwen2_5_VLModel(config))
    lm_keys = [k for k in lm.keys() if re.match(r"^(embed_tokens|layers|norm)\.", k)]
    # The vision checkpoint view may also hold quantisation scales; only module weights are loaded.
    vision_keys = [k for k in visual.keys() if not k.endswith((".scale_weight", ".scale_input"))]
    targets = fp8_targets(model, "language_model.layers.")
    items = list(stream_fp8(lm, [(f"language_model.{k}", (k, dtype)) for k in lm_keys], targets))
    items += [(f"visual.{k}", read_dequantized(visual, k, dtype)) for k in vision_keys]
    assign_weights(model, items, ckpt)
    return model.to(device).eval().requires_grad_(False)
