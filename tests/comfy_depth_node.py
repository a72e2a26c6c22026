"""Test-only: copied by tests/comfy_server.py into the test server's custom_nodes/ (never into a user's ComfyUI,
never part of the pack). It registers no node.

ComfyUI's CLIPLoader (type qwen_image) always builds the 28-layer Qwen2.5-VL-7B and leaves the layers a file
lacks uninitialised (torch.empty): on the real-width two-layer text encoder the tests use (tests/comfy_real_width.py;
a full 28-layer one is 15 GB) CLIPTextEncode returns NaN. This wraps `comfy.sd.load_clip`, which CLIPLoader
calls, to drop the layers the file does not hold, so the loaded network is the one the file describes. Files
with all their layers are left as ComfyUI built them.
"""

from __future__ import annotations

import logging
import re

import comfy.sd
from safetensors import safe_open

NODE_CLASS_MAPPINGS: dict = {}
LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
log = logging.getLogger("flowtuner.tests")


def file_layers(paths) -> int:
    """The number of language-model layers the files hold (0: none found)."""
    found = set()
    for path in paths:
        with safe_open(str(path), "pt") as f:
            found |= {int(m.group(1)) for k in f.keys() if not k.startswith("visual.") and (m := LAYER.search(k))}
    return max(found) + 1 if found else 0


def _qwen_text_model(clip):
    encoder = getattr(clip.cond_stage_model, "qwen25_7b", None)
    return encoder.transformer.model if encoder is not None else None


_load_clip = comfy.sd.load_clip


def load_clip(ckpt_paths, *args, **kwargs):
    clip = _load_clip(ckpt_paths, *args, **kwargs)
    model = _qwen_text_model(clip)
    depth = file_layers(ckpt_paths) if model is not None else 0
    if depth and len(model.layers) > depth:
        log.warning("flowtuner tests: Qwen text model cut from %d to the file's %d layers", len(model.layers), depth)
        model.layers = model.layers[:depth]
    return clip


comfy.sd.load_clip = load_clip
