"""Key conversion between the original Wan-2.1 VAE layout (ComfyUI `qwen_image_vae.safetensors`)
and diffusers' `AutoencoderKLQwenImage` layout. Tables plus two pure functions, inverse of each other.

Wan keeps the encoder's and decoder's blocks in flat lists; diffusers keeps the encoder flat but
groups the decoder into up-blocks of (R + 1) resnets and one upsampler, R = num_res_blocks.
"""

from __future__ import annotations

import re

# Residual-block sub-modules: Wan's Sequential indices -> diffusers names.
RESNET_PARTS = {"residual.0": "norm1", "residual.2": "conv1", "residual.3": "norm2", "residual.6": "conv2",
                "shortcut": "conv_shortcut"}
RESNET_PARTS_INV = {v: k for k, v in RESNET_PARTS.items()}
# Whole-prefix renames (Wan -> diffusers), applied after stripping `encoder.` / `decoder.`.
SIMPLE = {"conv1": "conv_in", "head.0": "norm_out", "head.2": "conv_out", "middle.1": "mid_block.attentions.0"}
SIMPLE_INV = {v: k for k, v in SIMPLE.items()}
MIDDLE_RESNETS = {"middle.0": "mid_block.resnets.0", "middle.2": "mid_block.resnets.1"}
MIDDLE_RESNETS_INV = {v: k for k, v in MIDDLE_RESNETS.items()}
TOP = {"conv1": "quant_conv", "conv2": "post_quant_conv"}
TOP_INV = {v: k for k, v in TOP.items()}

_RES = r"(?P<part>residual\.\d+|shortcut)\.(?P<leaf>.*)"
_RES_INV = r"(?P<part>norm1|conv1|norm2|conv2|conv_shortcut)\.(?P<leaf>.*)"


def is_wan_layout(keys) -> bool:
    return "conv1.weight" in keys or "decoder.middle.0.residual.0.gamma" in keys


def wan_num_res_blocks(keys) -> int:
    """R from a Wan-layout key set: the encoder's first downsampler sits at flat index R."""
    idx = [int(m.group(1)) for k in keys if (m := re.match(r"^encoder\.downsamples\.(\d+)\.resample\.", k))]
    if not idx:
        raise ValueError("no encoder downsampler found")
    return min(idx)


def wan_to_diffusers(key: str, num_res_blocks: int) -> str:
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        name, _, leaf = key.partition(".")
        return f"{TOP[name]}.{leaf}" if name in TOP else key
    for old, new in MIDDLE_RESNETS.items():
        if (m := re.fullmatch(re.escape(old) + r"\." + _RES, rest)):
            return f"{side}.{new}.{RESNET_PARTS[m['part']]}.{m['leaf']}"
    for old, new in SIMPLE.items():
        if rest.startswith(old + "."):
            return f"{side}.{new}{rest[len(old):]}"
    if (m := re.fullmatch(r"downsamples\.(?P<k>\d+)\." + _RES, rest)):
        return f"encoder.down_blocks.{m['k']}.{RESNET_PARTS[m['part']]}.{m['leaf']}"
    if (m := re.fullmatch(r"downsamples\.(?P<k>\d+)\.(?P<tail>(resample|time_conv)\..*)", rest)):
        return f"encoder.down_blocks.{m['k']}.{m['tail']}"
    per_block = num_res_blocks + 2  # R + 1 resnets, then one upsampler
    if (m := re.fullmatch(r"upsamples\.(?P<k>\d+)\." + _RES, rest)):
        b, j = divmod(int(m["k"]), per_block)
        return f"decoder.up_blocks.{b}.resnets.{j}.{RESNET_PARTS[m['part']]}.{m['leaf']}"
    if (m := re.fullmatch(r"upsamples\.(?P<k>\d+)\.(?P<tail>(resample|time_conv)\..*)", rest)):
        return f"decoder.up_blocks.{int(m['k']) // per_block}.upsamplers.0.{m['tail']}"
    raise KeyError(f"unknown Wan VAE key {key!r}")


def diffusers_to_wan(key: str, num_res_blocks: int) -> str:
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        name, _, leaf = key.partition(".")
        return f"{TOP_INV[name]}.{leaf}" if name in TOP_INV else key
    for new, old in MIDDLE_RESNETS_INV.items():
        if (m := re.fullmatch(re.escape(new) + r"\." + _RES_INV, rest)):
            return f"{side}.{old}.{RESNET_PARTS_INV[m['part']]}.{m['leaf']}"
    for new, old in SIMPLE_INV.items():
        if rest.startswith(new + "."):
            return f"{side}.{old}{rest[len(new):]}"
    if (m := re.fullmatch(r"down_blocks\.(?P<k>\d+)\." + _RES_INV, rest)):
        return f"encoder.downsamples.{m['k']}.{RESNET_PARTS_INV[m['part']]}.{m['leaf']}"
    if (m := re.fullmatch(r"down_blocks\.(?P<k>\d+)\.(?P<tail>(resample|time_conv)\..*)", rest)):
        return f"encoder.downsamples.{m['k']}.{m['tail']}"
    per_block = num_res_blocks + 2
    if (m := re.fullmatch(r"up_blocks\.(?P<b>\d+)\.resnets\.(?P<j>\d+)\." + _RES_INV, rest)):
        k = int(m["b"]) * per_block + int(m["j"])
        return f"decoder.upsamples.{k}.{RESNET_PARTS_INV[m['part']]}.{m['leaf']}"
    if (m := re.fullmatch(r"up_blocks\.(?P<b>\d+)\.upsamplers\.0\.(?P<tail>.*)", rest)):
        return f"decoder.upsamples.{int(m['b']) * per_block + per_block - 1}.{m['tail']}"
    raise KeyError(f"unknown diffusers VAE key {key!r}")
