"""SDXL LoRA names as kohya's sd-scripts writes them (networks.lora on SDXL), which ComfyUI and diffusers both read.

- UNet: `lora_unet_` + the module's ldm path with `_` for `.` (`down_blocks.1.attentions.0.transformer_blocks.0.
  attn1.to_q` -> `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`): sd-scripts' SDXL UNet is the ldm
  one, so its LoRAs carry ldm names; the rename comes from keys.py's table for SDXL's layout.
- Text encoders: `lora_te1_` (CLIP-L) and `lora_te2_` (bigG) + the transformers path of the module (sd-scripts runs
  both as transformers CLIP models), e.g. `lora_te2_text_model_encoder_layers_0_self_attn_q_proj`.

flowtuner's module paths: the UNet's own (diffusers UNet2DConditionModel), and `text_encoder.` / `text_encoder_2.` +
the CLIP model's path for the two encoders (diffusers' pipeline component names, which diffusers-format SDXL LoRAs
use as key prefixes too). Default training targets are kohya's for SDXL: the Linears inside every Transformer2DModel
(proj_in / proj_out, attention, feed-forward); LoCon's convolution LoRAs are refused when read (train/lora_formats.py).
"""

from __future__ import annotations

from functools import cache

from torch import nn

from flowtuner.errors import ConfigError
from flowtuner.families.sdxl import keys as K
from flowtuner.train.lora import LoRAWeights, merge_into

#: SDXL's UNet layout: 2 resnets per stage, cross-attention in the 2nd and 3rd of three stages
SDXL_LAYOUT = K.UNetLayout(layers_per_block=2, attends=(False, True, True))
#: transformer layers per attention, at most (SDXL base: 2 and 10)
MAX_TRANSFORMER_LAYERS = 10
#: the Linears of one BasicTransformerBlock (self-attention, cross-attention, GEGLU feed-forward)
TRANSFORMER_LINEARS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                       "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
#: the Linears of a Transformer2DModel outside its blocks (SDXL's use_linear_projection)
PROJECTIONS = ("proj_in", "proj_out")
#: the Linears of one CLIP encoder layer kohya trains (its CLIPAttention and CLIPMLP)
CLIP_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
#: text encoder -> (its path prefix in flowtuner, kohya's name prefix, layers at most: CLIP-L 12, bigG 32)
TEXT_ENCODERS = {"clip_l": ("text_encoder.", "lora_te1_", 12), "clip_g": ("text_encoder_2.", "lora_te2_", 32)}
UNET_PREFIX = "lora_unet_"


def _flat(path: str) -> str:
    return path.replace(".", "_")


def unet_lora_paths() -> list[str]:
    """Every LoRA-able Linear path of an SDXL UNet2DConditionModel (at most MAX_TRANSFORMER_LAYERS per attention)."""
    table = K.unet_table(SDXL_LAYOUT)
    attentions = [m for m in table.modules if m.split(".")[-2:-1] == ["attentions"]]
    layers = [f"transformer_blocks.{k}.{m}" for k in range(MAX_TRANSFORMER_LAYERS) for m in TRANSFORMER_LINEARS]
    return [f"{a}.{name}" for a in attentions for name in (*PROJECTIONS, *layers)]


@cache
def kohya_names() -> dict[str, str]:
    """{flowtuner module path: kohya name} for the UNet and both text encoders."""
    table = K.unet_table(SDXL_LAYOUT)
    names = {path: UNET_PREFIX + _flat(table.ldm_name(path)) for path in unet_lora_paths()}
    for prefix, kohya, layers in TEXT_ENCODERS.values():
        for i in range(layers):
            for m in CLIP_LINEARS:
                path = f"text_model.encoder.layers.{i}.{m}"
                names[prefix + path] = kohya + _flat(path)
    return names


def text_parts(weights: dict[str, LoRAWeights]) -> tuple[dict[str, LoRAWeights], dict[str, dict[str, LoRAWeights]]]:
    """(the UNet's modules, {text encoder: its modules by path inside it}) of a LoRA."""
    text = {name: {} for name in TEXT_ENCODERS}
    unet = {}
    for path, w in weights.items():
        owner = next((name for name, (prefix, _, _) in TEXT_ENCODERS.items() if path.startswith(prefix)), None)
        if owner is None:
            unet[path] = w
        else:
            text[owner][path[len(TEXT_ENCODERS[owner][0]):]] = w
    return unet, {name: part for name, part in text.items() if part}


def merge_text(models: dict[str, nn.Module], weights: dict[str, LoRAWeights], multiplier: float, source: str) -> None:
    """Merge a LoRA's text-encoder modules into `models` ({"clip_l": CLIPTextModel, "clip_g": ...WithProjection})."""
    unet, parts = text_parts(weights)
    if unet:
        raise ConfigError(f"{source}: {next(iter(unet))} is a UNet module, not a text encoder's.")
    for name, part in parts.items():
        model = models[name]
        part = {module_path(model, path): w for path, w in part.items()}
        merge_into(model, part, multiplier, source=f"{source} ({TEXT_ENCODERS[name][1]}*)")


def module_path(model: nn.Module, path: str) -> str:
    """A canonical CLIP path (`text_model.encoder...`, as kohya and the released files name it) as `model` names the
    module: transformers 5's CLIPTextModel has no `text_model.` level (text_models.py)."""
    try:
        model.get_submodule(path)
        return path
    except AttributeError:
        return path.removeprefix("text_model.")
