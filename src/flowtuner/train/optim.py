"""Optimizers and learning-rate schedules, registered by name."""

from __future__ import annotations

import ast
import importlib
import math
from collections.abc import Callable, Iterable

import torch

from flowtuner.errors import ConfigError


def parse_kv(items: list[str] | None, flag: str) -> dict:
    """['a=1', "b=['x', 'y']"] -> {'a': 1, 'b': ['x', 'y']} (values are Python literals, else strings)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} {item!r}: expected key=value.")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def _adamw8bit(params, **kw):
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError("--optimizer_type adamw8bit needs bitsandbytes (pip install bitsandbytes).") from None
    return bnb.optim.AdamW8bit(params, **kw)


def _adafactor(params, **kw):
    """flowtuner's Adafactor (same algorithm as transformers', plus stochastic rounding of bf16 weights and
    per-parameter steps for --fused_backward_pass)."""
    from flowtuner.train.adafactor import Adafactor

    return Adafactor(params, **kw)


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "adamw8bit": _adamw8bit,
    "adafactor": _adafactor,
}


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float, args: dict) -> torch.optim.Optimizer:
    key = name.lower()
    if key in OPTIMIZERS:
        factory = OPTIMIZERS[key]
    elif hasattr(torch.optim, name):
        factory = getattr(torch.optim, name)
    elif "." in name:
        module, _, cls = name.rpartition(".")
        try:
            factory = getattr(importlib.import_module(module), cls)
        except (ImportError, AttributeError):
            raise ConfigError(f"--optimizer_type {name}: cannot import it.") from None
    else:
        raise ConfigError(f"--optimizer_type {name}: unknown; use {', '.join(OPTIMIZERS)}, a torch.optim class or a dotted path.")
    try:
        return factory(list(params), lr=lr, **args)
    except TypeError as exc:
        raise ConfigError(f"--optimizer_args for {name}: {exc}.") from None


def _constant(step, total, warmup, min_ratio):
    return 1.0


def _constant_with_warmup(step, total, warmup, min_ratio):
    return min(1.0, (step + 1) / warmup) if warmup else 1.0


def _linear(step, total, warmup, min_ratio):
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def _cosine_with_min_lr(step, total, warmup, min_ratio):
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _cosine(step, total, warmup, min_ratio):
    return _cosine_with_min_lr(step, total, warmup, 0.0)


SCHEDULES: dict[str, Callable[[int, int, int, float], float]] = {
    "constant": _constant, "constant_with_warmup": _constant_with_warmup, "linear": _linear,
    "cosine": _cosine, "cosine_with_min_lr": _cosine_with_min_lr,
}


def warmup_steps(value: float, total: int) -> int:
    return int(value * total) if 0 < value < 1 else int(value)


def make_schedule(name: str, optimizer: torch.optim.Optimizer, total: int, warmup: float, min_ratio: float):
    if name not in SCHEDULES:
        raise ConfigError(f"--lr_scheduler {name}: unknown; choose one of {', '.join(SCHEDULES)}.")
    fn, steps = SCHEDULES[name], warmup_steps(warmup, total)
    if name == "constant" and steps:
        raise ConfigError("--lr_warmup_steps has no effect with --lr_scheduler constant; use constant_with_warmup.")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: fn(step, total, steps, min_ratio))
