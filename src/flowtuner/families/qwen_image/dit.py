"""Qwen-Image DiT: find the weights in any layout users have, infer the architecture from tensor
shapes, and materialise `diffusers.QwenImageTransformer2DModel` once (meta init + assign)."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import QwenImageTransformer2DModel

from flowtuner.errors import WeightsError
from flowtuner.families.identify import describe
from flowtuner.weights.materialize import (
    assign_weights, build_empty, check_supported_quantisation, is_auxiliary, read_dequantized, read_fp8, storage_dtype,
)
from flowtuner.weights.fp8 import FP8, SCALED_DEFAULT, Fp8Policy, convert_linears, fp8_requested, fp8_scaled_requested, scale_shape
from flowtuner.weights.reader import Checkpoint, open_checkpoint

log = logging.getLogger(__name__)

# Prefixes seen in the wild: bare (diffusers, Comfy-Org split files, musubi), ComfyUI full checkpoints.
DIT_PREFIXES = ("", "model.diffusion_model.", "diffusion_model.", "model.")
DIT_PROBE = "txt_norm.weight"
# 2511 ComfyUI files carry this marker; the edit family will switch on zero_cond_t from it.
INDEX_TIMESTEP_ZERO = "__index_timestep_zero__"
# Every released Qwen-Image DiT uses 128-dim heads with these RoPE axes; other head sizes need config.json.
ROPE_AXES_BY_HEAD_DIM = {128: (16, 56, 56)}
PATCH_SIZE = 2
BLOCK_RE = re.compile(r"^transformer_blocks\.(\d+)\.(.*)$")


@dataclass
class DiTInfo:
    config: dict
    prefix: str
    dtype: torch.dtype
    index_timestep_zero: bool
    block_remap: dict[int, int]


# Which DiT Linears --fp8_base stores in fp8, measured on the loud tiny DiT (docs/memory.md "fp8 base"); `blocks`
# is what --fp8_base uses (as musubi-tuner).
FP8_POLICIES: dict[str, Fp8Policy] = {
    "blocks": Fp8Policy(r"transformer_blocks\.\d+\..*", "every Linear of the blocks, modulation (img_mod / txt_mod) included"),
    "blocks_no_mod": Fp8Policy(r"transformer_blocks\.\d+\.(?!img_mod|txt_mod).*", "block Linears except the modulation"),
    "all_linears": Fp8Policy(r".*", "every Linear, the stem (img_in, txt_in, timestep embedding, norm_out, proj_out) too"),
}
FP8_DEFAULT = "blocks"


def find_prefix(ckpt: Checkpoint, probe: str, prefixes: tuple[str, ...]) -> str | None:
    for prefix in prefixes:
        if prefix + probe in ckpt:
            return prefix
    return None


def _block_remap(keys: list[str]) -> dict[int, int]:
    """Block indices in the file -> contiguous indices 0..n-1 (pruned files may skip numbers)."""
    found = sorted({int(m.group(1)) for k in keys if (m := BLOCK_RE.match(k))})
    return {old: new for new, old in enumerate(found)}


def infer_config(ckpt: Checkpoint, remap: dict[int, int]) -> dict:
    """QwenImageTransformer2DModel arguments from tensor shapes alone."""
    inner, in_channels = ckpt.shape("img_in.weight")
    head_dim = ckpt.shape("transformer_blocks.0.attn.norm_q.weight")[0] if remap else 128
    if head_dim not in ROPE_AXES_BY_HEAD_DIM:
        raise WeightsError(
            f"{ckpt.path}: head size {head_dim} is not a released Qwen-Image size; put the model's "
            "diffusers config.json beside the file."
        )
    if "time_text_embed.addition_t_embedding.weight" in ckpt:
        raise WeightsError(f"{ckpt.path}: a Qwen-Image-Layered DiT, which flowtuner does not support yet.")
    return {
        "patch_size": PATCH_SIZE,
        "in_channels": in_channels,
        "out_channels": ckpt.shape("proj_out.weight")[0] // PATCH_SIZE**2,
        "num_layers": len(remap),
        "attention_head_dim": head_dim,
        "num_attention_heads": inner // head_dim,
        "joint_attention_dim": ckpt.shape("txt_in.weight")[1],
        "guidance_embeds": False,
        "axes_dims_rope": ROPE_AXES_BY_HEAD_DIM[head_dim],
    }


def _config_json(path: Path) -> dict | None:
    folder = path if path.is_dir() else path.parent
    file = folder / "config.json"
    if not file.exists():
        return None
    config = json.loads(file.read_text())
    if config.get("_class_name") not in (None, QwenImageTransformer2DModel.__name__):
        return None
    return config


def inspect_dit(ckpt: Checkpoint) -> DiTInfo:
    check_supported_quantisation(ckpt)
    prefix = find_prefix(ckpt, DIT_PROBE, DIT_PREFIXES)
    if prefix is None:
        raise WeightsError(f"{ckpt.path}: expected a Qwen-Image DiT, but this looks like {describe(ckpt)}.")
    sub = ckpt.select(prefix)
    remap = _block_remap(sub.keys())
    if remap and list(remap) != list(range(len(remap))):
        log.warning("%s: block indices are not contiguous (pruned model); renumbering %d blocks", ckpt.path, len(remap))
    config = _config_json(ckpt.path) or infer_config(sub, remap)
    return DiTInfo(config, prefix, storage_dtype(sub, "img_in.weight"), INDEX_TIMESTEP_ZERO in sub, remap)


def module_key(key: str, remap: dict[int, int]) -> str:
    m = BLOCK_RE.match(key)
    return f"transformer_blocks.{remap[int(m.group(1))]}.{m.group(2)}" if m else key


def load_dit(path: str | Path, device: torch.device | str = "cpu", fp8: bool | None = None,
             scaled: bool | None = None) -> tuple[QwenImageTransformer2DModel, DiTInfo]:
    """`fp8`: store the block Linears as float8_e4m3fn; `scaled`: with a per-channel scale (--fp8_scaled, implies
    `fp8`). None: as the enclosing `fp8_base()` / `fp8_scaled()` contexts say."""
    ckpt = open_checkpoint(path)
    info = inspect_dit(ckpt)
    sub = ckpt.select(info.prefix)
    model = build_empty(lambda: QwenImageTransformer2DModel.from_config(info.config))
    scaled = fp8_scaled_requested() if scaled is None else scaled
    fp8 = scaled or (fp8_requested() if fp8 is None else fp8)
    targets = FP8_POLICIES[FP8_DEFAULT].targets(model) if fp8 else set()
    granularity = SCALED_DEFAULT if scaled else None
    convert_linears(model, targets, _scale_shapes(sub, info, targets, granularity))
    assign_weights(model, _stream(sub, info, targets, granularity), ckpt)
    return model.to(device).eval().requires_grad_(False), info


def _scale_shapes(sub: Checkpoint, info: DiTInfo, targets: set[str], granularity: str | None) -> dict[str, tuple]:
    """fp8 target -> the shape of its scale buffer: the file's (an fp8_scaled file), or the one --fp8_scaled
    quantises to (a high-precision weight); absent: unscaled."""
    shapes, kept, kept_scaled = {}, 0, 0
    for key in sub.keys():
        path = module_key(key, info.block_remap).removesuffix(".weight")
        if not key.endswith(".weight") or path not in targets:
            continue
        file_scale = key.removesuffix(".weight") + ".scale_weight"
        if sub.dtype(key) == FP8:
            kept += 1
            if file_scale in sub:
                kept_scaled += 1
                shapes[path] = sub.shape(file_scale)
        elif granularity is not None:
            shapes[path] = scale_shape(sub.shape(key), granularity)
    if kept and granularity is not None:  # musubi-tuner refuses these files; keeping their values is exact
        log.info("--fp8_scaled: %s already holds %d of the %d fp8 weights as float8_e4m3fn (%d with per-tensor scales): "
                 "kept as stored, not quantised again", sub.path, kept, len(targets), kept_scaled)
    return shapes


def _stream(sub: Checkpoint, info: DiTInfo, fp8_targets: set[str], granularity: str | None):
    """(module key, tensor) one at a time: fp8 targets quantised (or kept as the file's fp8), the rest in the
    compute dtype, so the model never exists in high precision in RAM."""
    scratch = None
    if granularity is not None:  # one buffer the high-precision weights are read into (bench/fp8_load_memory.py)
        sizes = [sub.entries[k].nbytes for k in sub.keys() if module_key(k, info.block_remap).removesuffix(".weight") in fp8_targets]
        scratch = torch.empty(max(sizes, default=0), dtype=torch.uint8)
    for key in sub.keys():
        if is_auxiliary(key):
            continue
        name = module_key(key, info.block_remap)
        path, _, leaf = name.rpartition(".")
        if leaf == "weight" and path in fp8_targets:
            weight, scale = read_fp8(sub, key, granularity, scratch)
            yield name, weight
            if scale is not None:
                yield f"{path}.scale_weight", scale
        else:
            yield name, read_dequantized(sub, key, info.dtype)
