"""Turn checkpoint tensors into module weights: fp8 dequantisation, dtype casts, and assign-loading
into a module built on the meta device, so weights exist in memory exactly once."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from accelerate import init_empty_weights

from flowtuner.errors import WeightsError
from flowtuner.weights.reader import Checkpoint

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# ComfyUI "fp8_scaled" files: `<module>.scale_weight` beside `<module>.weight`, plus this marker key.
SCALED_FP8_MARKER = "scaled_fp8"
SCALE_SUFFIXES = (".scale_weight", ".scale_input")
FP8MIXED_SUFFIXES = (".comfy_quant", ".weight_scale")


def check_supported_quantisation(ckpt: Checkpoint) -> None:
    if any(k.endswith(FP8MIXED_SUFFIXES) for k in ckpt.keys()):
        raise WeightsError(
            f"{ckpt.path}: a ComfyUI 'fp8mixed' file (.comfy_quant / .weight_scale keys), which flowtuner "
            "does not read yet; use the bf16, fp8_e4m3fn or fp8_scaled release."
        )


def is_auxiliary(key: str) -> bool:
    """Keys that carry quantisation data or markers rather than module weights."""
    return key == SCALED_FP8_MARKER or key.endswith(SCALE_SUFFIXES) or key.startswith("__")


def read_dequantized(ckpt: Checkpoint, key: str, dtype: torch.dtype) -> torch.Tensor:
    """Read `key` and return it as `dtype`. fp8 weights with a `scale_weight` sibling are multiplied
    by it (diffusers ignores the scale and loads these files silently wrong)."""
    tensor = ckpt.read(key)
    if tensor.dtype in FP8_DTYPES:
        scale_key = key[: -len(".weight")] + ".scale_weight" if key.endswith(".weight") else None
        if scale_key and scale_key in ckpt:
            scale = ckpt.read(scale_key).to(torch.float32)
            return (tensor.to(torch.float32) * scale).to(dtype)
        return tensor.to(dtype)
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def read_fp8(ckpt: Checkpoint, key: str, granularity: str | None = None,
             scratch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`key` as an e4m3fn weight and its scale (None: unscaled), one tensor at a time. e4m3fn files (ComfyUI
    fp8_e4m3fn and fp8_scaled) come as they are, with the file's per-tensor scale if it has one: never rounded a
    second time. Anything else is quantised from its own dtype: with a scale of `granularity` (--fp8_scaled, a
    flowtuner.weights.fp8.GRANULARITIES name) or plainly. `scratch` (uint8, reused for every weight): where a
    weight quantised with a scale is read, so the host heap does not fill with freed high-precision copies."""
    from flowtuner.weights.fp8 import FP8, quantise, quantise_scaled

    entry = ckpt.entries[key]
    fits = scratch is not None and granularity is not None and entry.dtype not in FP8_DTYPES and entry.nbytes <= scratch.numel()
    tensor = ckpt.read(key, scratch[:entry.nbytes].view(entry.dtype).view(entry.shape) if fits else None)
    scale_key = key[: -len(".weight")] + ".scale_weight"
    scale = ckpt.read(scale_key).to(torch.float32) if tensor.dtype in FP8_DTYPES and scale_key in ckpt else None
    if tensor.dtype == FP8:
        return tensor, scale
    if granularity is not None:
        source = tensor if tensor.dtype not in FP8_DTYPES else read_dequantized(ckpt, key, torch.float32)
        return quantise_scaled(source, granularity)
    return quantise(read_dequantized(ckpt, key, torch.float32)), None


def storage_dtype(ckpt: Checkpoint, probe_key: str) -> torch.dtype:
    """The float dtype weights are computed in: the file's own dtype, fp8 promoted to bf16."""
    dtype = ckpt.dtype(probe_key)
    return torch.bfloat16 if dtype in FP8_DTYPES else dtype


def build_empty(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a module with parameters on the meta device (buffers stay real, e.g. RoPE tables)."""
    with init_empty_weights(include_buffers=False):
        return factory()


def assign_weights(
    module: torch.nn.Module,
    items: Iterable[tuple[str, torch.Tensor]],
    source: Checkpoint,
    ignore_missing: Iterable[str] = (),
) -> torch.nn.Module:
    """Load (module key, tensor) pairs into an empty module by assignment; every parameter must be
    covered, nothing may be left over."""
    state = dict(items)
    expected = set(module.state_dict().keys())
    missing = sorted(expected - set(state) - set(ignore_missing))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} weights missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unknown keys (e.g. {unexpected[0]})")
        raise WeightsError(f"{source.path}: does not match the model: {'; '.join(parts)}.")
    params = dict(module.named_parameters())
    for key, tensor in state.items():
        ref = params.get(key)
        if ref is not None and tuple(ref.shape) != tuple(tensor.shape):
            raise WeightsError(
                f"{source.path}: {key} has shape {tuple(tensor.shape)}, the model expects {tuple(ref.shape)}."
            )
    module.load_state_dict(state, strict=False, assign=True)
    return module
