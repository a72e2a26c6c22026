"""SDXL's two text encoders as transformers models: CLIP-L (`CLIPTextModel`) and OpenCLIP-bigG
(`CLIPTextModelWithProjection`), from any layout (checkpoint.py), built once on the meta device.

Names inside flowtuner are "canonical" transformers names (`text_model.…`, `text_projection.weight`), as in the
released files; transformers 5's `CLIPTextModel` drops the `text_model.` level in its own module names, so the
last step maps canonical names onto whatever the installed class uses."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from flowtuner.families.sdxl import keys as K
from flowtuner.families.sdxl.checkpoint import Source, find_component
from flowtuner.families.sdxl.configs import CLIP_G, CLIP_L, infer_clip
from flowtuner.weights.materialize import assign_weights, build_empty

CANONICAL = ("text_model.", "text_projection.")
# component -> (transformers class, built-in config the shapes refine, key table for its ldm names)
ENCODERS = {
    "clip_l": (CLIPTextModel, CLIP_L, lambda keys: K.clip_l_table()),
    "clip_g": (CLIPTextModelWithProjection, CLIP_G, lambda keys: K.clip_g_table(K.clip_g_layers(keys))),
}


def canonical(key: str) -> str:
    return key if key.startswith(CANONICAL) else "text_model." + key


def canonical_clip_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CLIP model's weights under canonical names (views, nothing copied)."""
    return {canonical(k): v for k, v in model.state_dict().items()}


def _module_names(model: torch.nn.Module):
    own = set(model.state_dict())
    return lambda key: key if key in own else key.removeprefix("text_model.")


def _items(src: Source, component: str, dtype: torch.dtype | None):
    """(canonical key, tensor) pairs, streamed, and their shapes."""
    keys = src.keys()
    read = src.reader(dtype)
    if src.names == "diffusers":
        return ((canonical(k), read(k)) for k in keys), {canonical(k): src.ckpt.shape(k) for k in keys}
    table = ENCODERS[component][2](keys)
    return K.to_diffusers_items(keys, read, table, component), K.diffusers_shapes(keys, src.ckpt.shape, table, component)


def load_clip(path: str | Path, component: str, device: torch.device | str = "cpu",
              dtype: torch.dtype | None = None) -> torch.nn.Module:
    """`component`: "clip_l" or "clip_g". `dtype`: None keeps the file's."""
    cls, base, _ = ENCODERS[component]
    src = find_component(path, component)
    # not the integer position_ids a file may list first (safetensors orders tensors by dtype size)
    probe = next((k for k in src.keys() if k not in K.DROPPED[component]), src.keys()[0])
    items, shapes = _items(src, component, dtype or src.dtype(probe))
    if src.config and src.config.get("model_type") == "clip_text_model":
        config = CLIPTextConfig.from_dict(src.config)
    else:
        config = CLIPTextConfig(**infer_clip(shapes, base))
    model = build_empty(lambda: cls(config))
    name = _module_names(model)
    dropped = {K.DROPPED["clip_l"][0]}  # a buffer some diffusers-named files carry too
    assign_weights(model, ((name(k), v) for k, v in items if k not in dropped), src.ckpt)
    return model.to(device).eval().requires_grad_(False)


def load_text_encoders(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
    """(CLIP-L, OpenCLIP-bigG) from a single-file checkpoint or a diffusers folder."""
    return load_clip(path, "clip_l", device, dtype), load_clip(path, "clip_g", device, dtype)
