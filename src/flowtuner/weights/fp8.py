"""fp8 base weights (`--fp8_base`): Linear weights stored as float8_e4m3fn and up-cast inside the forward to
the compute dtype, quantised tensor by tensor while a checkpoint streams in.

Which Linears are stored in fp8 is a policy the family gives (Qwen-Image: families/qwen_image/dit.py FP8_POLICIES;
docs/memory.md "fp8 base" has the measured errors); its default keeps everything outside the transformer blocks
(img_in, txt_in, the timestep embedding, norm_out, proj_out) and every norm in the file's dtype, as musubi-tuner's
fp8 layer choice does.

The backward pass never keeps an up-cast copy of a weight: Fp8LinearFunction saves the fp8 tensor and up-casts it
again for the input gradient, so a frozen fp8 base costs one byte per weight in training too, with or without
gradient checkpointing (plain autocast up-casting keeps a bf16 copy of every weight alive until backward).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


@dataclass(frozen=True)
class Fp8Policy:
    """Linear module paths (full match) whose weights are stored in fp8; the rest keep the file's dtype."""

    pattern: str
    note: str

    def targets(self, model: nn.Module) -> set[str]:
        rx = re.compile(self.pattern)
        return {name for name, m in model.named_modules() if isinstance(m, nn.Linear) and rx.fullmatch(name)}


def _switch(name: str, doc: str):
    """A context manager that turns a load-time option on for the models loaded inside it (lets a command choose
    without every family's loader signature carrying the option), and the function that reads it."""
    var: ContextVar[bool] = ContextVar(name, default=False)

    @contextmanager
    def switch(enabled: bool = True) -> Iterator[None]:
        token = var.set(bool(enabled))
        try:
            yield
        finally:
            var.reset(token)

    switch.__doc__ = doc
    return switch, var.get


fp8_base, fp8_requested = _switch("fp8_base", "Models loaded inside store their base Linears in fp8 (--fp8_base).")
fp8_scaled, fp8_scaled_requested = _switch(
    "fp8_scaled", "fp8 base Linears loaded inside are quantised with a scale (--fp8_scaled): SCALED_DEFAULT's "
                  "granularity; fp8 weights already in the file are kept as stored.")
fp8_text_encoder, fp8_text_requested = _switch(
    "fp8_vl", "Text encoders loaded inside store their language model's Linears in fp8 (--fp8_vl); what they output "
              "(the embeddings, cached or not) stays in the compute dtype.")


@dataclass(frozen=True)
class Granularity:
    """Which weights share one scale: `rows` x `cols` tiles of a [out, in] weight (None: the whole dimension)."""

    rows: int | None
    cols: int | None
    note: str

    def block(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """The tile for a 2-D weight of `shape`; per output channel when the tile does not divide it (musubi-tuner
        falls back the same way)."""
        out, inp = shape
        rows, cols = self.rows or out, self.cols or inp
        return (rows, cols) if out % rows == 0 and inp % cols == 0 else (1, inp)


# Scale granularities measured in docs/memory.md "fp8 scaled" (bench/fp8_scaled_error.py).
GRANULARITIES: dict[str, Granularity] = {
    "tensor": Granularity(None, None, "one scale per weight (ComfyUI fp8_scaled files)"),
    "channel": Granularity(1, None, "one scale per output channel (row)"),
    "block64": Granularity(1, 64, "one scale per 64 inputs of a row (musubi-tuner's --fp8_scaled)"),
    "block128": Granularity(1, 128, "one scale per 128 inputs of a row"),
    "tile128": Granularity(128, 128, "one scale per 128x128 tile"),
}
SCALED_DEFAULT = "channel"
# elements quantised at a time: bounds the float32 temporaries of a large weight (~64 MB)
CHUNK_ELEMENTS = 1 << 24


def scale_shape(shape: tuple[int, ...], granularity: str = SCALED_DEFAULT) -> tuple[int, ...]:
    """The stored layout: [1] per tensor (ComfyUI's), [out, 1] per channel, [out, in/cols, 1] per row block
    (musubi-tuner's), [out/rows, 1, in/cols, 1] per tile."""
    if len(shape) != 2:
        return (1,)
    out, inp = shape
    rows, cols = GRANULARITIES[granularity].block(tuple(shape))
    if (rows, cols) == (out, inp):
        return (1,)
    if (rows, cols) == (1, inp):
        return (out, 1)
    return (out, inp // cols, 1) if rows == 1 else (out // rows, 1, inp // cols, 1)


def _tiles(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`weight` viewed so that `scale`, in any stored layout, broadcasts against it."""
    if scale.ndim <= 2:
        return weight
    out, inp = weight.shape
    if scale.ndim == 3:
        return weight.view(out, scale.shape[1], inp // scale.shape[1])
    return weight.view(scale.shape[0], out // scale.shape[0], scale.shape[2], inp // scale.shape[2])


def _round_scale(amax: torch.Tensor) -> torch.Tensor:
    """amax / 448 as a bf16-representable float32 (a bf16 up-cast multiplies by it exactly), kept away from zero
    (an all-zero tile); the largest value may then round past 448 by < 0.4 % and saturate."""
    return (amax.float() / FP8_MAX).clamp_(min=1e-12).to(torch.bfloat16).float()


def quantise_scaled(weight: torch.Tensor, granularity: str = SCALED_DEFAULT) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3fn values, float32 scale in scale_shape's layout) with weight ~= q * scale, each tile's largest |w|
    mapped to 448."""
    if weight.dtype == FP8:
        raise ValueError("quantise_scaled: the weight is already fp8; re-quantising would round it twice")
    if weight.ndim != 2:
        scale = _round_scale(weight.abs().amax().reshape(1))
        return quantise(weight.float() / scale), scale
    q, scale = _quantise_tiles(weight, *GRANULARITIES[granularity].block(tuple(weight.shape)))
    return q, scale.reshape(scale_shape(tuple(weight.shape), granularity))


def _tile_of(scale: torch.Tensor, shape: tuple[int, int]) -> tuple[int, int]:
    """The tile a stored scale layout stands for (scale_shape's inverse)."""
    out, inp = shape
    if scale.numel() == 1:
        return out, inp
    if scale.ndim == 2:
        return 1, inp
    if scale.ndim == 3:
        return 1, inp // scale.shape[1]
    return out // scale.shape[0], inp // scale.shape[2]


@torch.no_grad()
def _quantise_tiles(weight: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Works through the rows a chunk at a time, so a large weight never exists in float32 whole; returns the scale
    as [out/rows, 1, in/cols, 1]."""
    out, inp = weight.shape
    q = torch.empty((out, inp), dtype=FP8, device=weight.device)
    if (rows, cols) == (out, inp):
        step = max(1, CHUNK_ELEMENTS // inp)
        amax = torch.stack([weight[i:i + step].abs().amax() for i in range(0, out, step)]).amax()
        scale = _round_scale(amax.reshape(1, 1, 1, 1))
        for i in range(0, out, step):
            q[i:i + step].copy_(weight[i:i + step].to(torch.float32, copy=True).div_(scale[0, 0]).clamp_(-FP8_MAX, FP8_MAX))
        return q, scale
    step = max(1, CHUNK_ELEMENTS // (inp * rows)) * rows
    tiles = []
    for i in range(0, out, step):
        chunk = weight[i:i + step].to(torch.float32, copy=True).view(-1, rows, inp // cols, cols)  # never the caller's tensor
        s = _round_scale(torch.maximum(chunk.amax(dim=(1, 3), keepdim=True), -chunk.amin(dim=(1, 3), keepdim=True)))
        # written straight into the result: no fp8 temporary per chunk (freed chunks fragment the host heap)
        q[i:i + step].view(-1, rows, inp // cols, cols).copy_(chunk.div_(s).clamp_(-FP8_MAX, FP8_MAX))
        tiles.append(s)
    return q, torch.cat(tiles)


def stream_fp8(ckpt, items, targets: set[str]):
    """(module key, tensor) pairs with the weights of `targets` read as e4m3fn (`items`: module key -> file key and
    the dtype the others are read in), one tensor at a time."""
    from flowtuner.weights.materialize import read_dequantized, read_fp8

    for name, (key, dtype) in items:
        path, _, leaf = name.rpartition(".")
        if leaf == "weight" and path in targets:
            yield name, read_fp8(ckpt, key)[0]
        else:
            yield name, read_dequantized(ckpt, key, dtype)


def quantise(tensor: torch.Tensor) -> torch.Tensor:
    """Round to e4m3fn, saturating at +-448 (real DiT weights are far below; the clamp makes the rule explicit)."""
    if tensor.dtype == FP8:
        return tensor
    return tensor.float().clamp(-FP8_MAX, FP8_MAX).to(FP8)


def _dequantised(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    w = weight.to(dtype)
    if scale is None:
        return w
    return (_tiles(w, scale) * scale.to(dtype)).view(weight.shape)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class Fp8LinearFunction(torch.autograd.Function):
    """y = x W^T + b with W up-cast on the fly; saves the fp8 W (not the up-cast copy) for the input gradient.
    The base is frozen: no gradient for W, the scale or the bias."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias):
        dtype = _compute_dtype(x)
        ctx.save_for_backward(weight, scale)
        ctx.x_dtype = x.dtype
        b = bias.to(dtype) if bias is not None else None
        return F.linear(x.to(dtype), _dequantised(weight, scale, dtype), b)

    @staticmethod
    def backward(ctx, grad_out):
        weight, scale = ctx.saved_tensors
        grad_x = grad_out @ _dequantised(weight, scale, grad_out.dtype) if ctx.needs_input_grad[0] else None
        return (grad_x.to(ctx.x_dtype) if grad_x is not None else None), None, None, None


class Fp8Linear(nn.Linear):
    """An nn.Linear (LoRA selection, hooks and state-dict keys see an ordinary Linear) whose weight is fp8.
    `scale_weight` (a buffer) exists for scaled weights: per tensor (ComfyUI fp8_scaled files, kept as they are), per
    output channel (--fp8_scaled), per row block or tile (musubi-tuner's layouts); `scale_shape` lists them."""

    scale_weight: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad:
            raise RuntimeError("an fp8 base weight is frozen; full fine-tuning cannot train fp8 weights")
        return Fp8LinearFunction.apply(x, self.weight, getattr(self, "scale_weight", None), self.bias)

    def dequantised(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return _dequantised(self.weight, getattr(self, "scale_weight", None), dtype)

    @torch.no_grad()
    def merge_(self, delta: torch.Tensor) -> None:
        """W <- W + delta in float32, re-quantised: plain e4m3fn stays unscaled; a scaled weight gets a scale
        recomputed for the merged values in its own layout (the LoRA may move a tile's largest value)."""
        scale = getattr(self, "scale_weight", None)
        merged = self.dequantised(torch.float32) + delta.to(self.weight.device, torch.float32)
        if scale is None:
            self.weight.copy_(quantise(merged))
            return
        q, new = _quantise_tiles(merged, *_tile_of(scale, tuple(merged.shape)))
        self.weight.copy_(q)
        self.scale_weight = new.reshape(scale.shape).to(scale.dtype)


def convert_linears(model: nn.Module, targets: set[str], scaled: dict[str, tuple[int, ...]]) -> None:
    """Turn the target Linears (still on the meta device) into Fp8Linear before their weights are assigned;
    `scaled`: target -> shape of its scale (the file's, or the one --fp8_scaled quantises to)."""
    for path in targets:
        module = model.get_submodule(path)
        module.__class__ = Fp8Linear
        if path in scaled:
            module.register_buffer("scale_weight", torch.empty(scaled[path], dtype=torch.float32))


@torch.no_grad()
def quantise_module(model: nn.Module, policy: Fp8Policy, granularity: str | None = None) -> nn.Module:
    """An already-loaded model's policy Linears to fp8, in place (models built in memory: benchmarks, tests, the
    plan's trace); `granularity`: scaled (a GRANULARITIES name), else plain e4m3fn."""
    for path in policy.targets(model):
        module = model.get_submodule(path)
        module.__class__ = Fp8Linear
        if granularity is None:
            module.weight = nn.Parameter(quantise(module.weight.data), requires_grad=False)
            continue
        q, scale = quantise_scaled(module.weight.data, granularity)
        module.weight = nn.Parameter(q, requires_grad=False)
        module.register_buffer("scale_weight", scale)
    return model


def fp8_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of fp8 parameters, bytes of all parameters)."""
    params = list(model.parameters())
    return (sum(p.numel() * p.element_size() for p in params if p.dtype == FP8),
            sum(p.numel() * p.element_size() for p in params))
