"""The SDXL UNet: any layout (checkpoints.py) -> `diffusers.UNet2DConditionModel`, built once on the meta device
and filled tensor by tensor."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from flowtuner.errors import WeightsError
from flowtuner.families.sdxl import keys as K
from flowtuner.families.sdxl.checkpoint import Source, find_component
from flowtuner.families.sdxl.configs import infer_unet
from flowtuner.weights.materialize import assign_weights, build_empty


def unet_view(src: Source) -> tuple[K.KeyTable | None, dict[str, tuple[int, ...]]]:
    """The ldm -> diffusers table (None: the file has diffusers names) and the diffusers-named shapes."""
    keys = src.keys()
    if src.names == "diffusers":
        return None, {k: src.ckpt.shape(k) for k in keys}
    table = K.unet_table(K.UNetLayout.from_ldm_keys(keys))
    return table, K.diffusers_shapes(keys, src.ckpt.shape, table, "unet")


def unet_config(src: Source, shapes: dict[str, tuple[int, ...]]) -> dict:
    config = src.config if src.config and src.config.get("_class_name") == UNet2DConditionModel.__name__ else None
    if "add_embedding.linear_1.weight" not in shapes or (config and config.get("addition_embed_type") != "text_time"):
        raise WeightsError(f"{src.ckpt.path}: an SD 1.x / 2.x UNet (no SDXL size / crop embedding); only SDXL is "
                           "supported. Use an SDXL checkpoint.")
    return config or infer_unet(shapes)


def load_unet(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> UNet2DConditionModel:
    """`dtype`: the weights' dtype in memory (None: the file's, fp8 read as bf16)."""
    src = find_component(path, "unet")
    table, shapes = unet_view(src)
    config = unet_config(src, shapes)
    keys = src.keys()
    dtype = dtype or src.dtype(keys[0])
    model = build_empty(lambda: UNet2DConditionModel.from_config(config))
    read = src.reader(dtype)
    items = ((k, read(k)) for k in keys) if table is None else K.to_diffusers_items(keys, read, table, "unet")
    assign_weights(model, items, src.ckpt)
    return model.to(device).eval().requires_grad_(False)
