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
fp8_text_encoder, fp8_text_requested = _switch(
    "fp8_vl", "Text encoders loaded inside store their language model's Linears in fp8 (--fp8_vl); what they output "
              "(the embeddings, cached or not) stays in the compute dtype.")


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
    return tensor.float().clamp_(-FP8_MAX, FP8_MAX).to(FP8)


def _dequantised(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    w = weight.to(dtype)
    return w * scale.to(dtype) if scale is not None else w


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
    `scale_weight` (a per-tensor buffer) exists only for ComfyUI fp8_scaled files loaded as they are."""

    scale_weight: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad:
            raise RuntimeError("an fp8 base weight is frozen; full fine-tuning cannot train fp8 weights")
        return Fp8LinearFunction.apply(x, self.weight, getattr(self, "scale_weight", None), self.bias)

    def dequantised(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return _dequantised(self.weight, getattr(self, "scale_weight", None), dtype)

    @torch.no_grad()
    def merge_(self, delta: torch.Tensor) -> None:
        """W <- W + delta in float32, re-quantised with the same scale (musubi-tuner merges before quantising)."""
        scale = getattr(self, "scale_weight", None)
        merged = self.dequantised(torch.float32) + delta.to(self.weight.device, torch.float32)
        self.weight.copy_(quantise(merged / scale.float() if scale is not None else merged))


def convert_linears(model: nn.Module, targets: set[str], scaled: dict[str, torch.Size]) -> None:
    """Turn the target Linears (still on the meta device) into Fp8Linear before their weights are assigned;
    `scaled`: target -> shape of its per-tensor scale in the file."""
    for path in targets:
        module = model.get_submodule(path)
        module.__class__ = Fp8Linear
        if path in scaled:
            module.register_buffer("scale_weight", torch.empty(scaled[path], dtype=torch.float32))


@torch.no_grad()
def quantise_module(model: nn.Module, policy: Fp8Policy) -> nn.Module:
    """An already-loaded model's policy Linears to fp8, in place (models built in memory: benchmarks, tests)."""
    for path in policy.targets(model):
        module = model.get_submodule(path)
        module.__class__ = Fp8Linear
        module.weight = nn.Parameter(quantise(module.weight.data), requires_grad=False)
    return model


def fp8_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of fp8 parameters, bytes of all parameters)."""
    params = list(model.parameters())
    return (sum(p.numel() * p.element_size() for p in params if p.dtype == FP8),
            sum(p.numel() * p.element_size() for p in params))
