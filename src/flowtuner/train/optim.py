"""Optimizers and learning-rate schedules, registered by name."""

from __future__ import annotations

import ast
import importlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

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
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--optimizer_args for {name}: {exc}.") from None


# ---------------------------------------------------------------- learning-rate schedules
# Each is the lr factor at optimizer step `step` (LambdaLR's counter, 0 before the first update), with the
# formulas and parameter names of transformers' / diffusers' get_scheduler functions, which musubi-tuner calls.


def _constant(step):
    return 1.0


def _constant_with_warmup(step, warmup):
    return step / max(1, warmup) if step < warmup else 1.0


def _linear(step, warmup, total):
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def _cosine(step, warmup, total, num_cycles=0.5, min_lr_rate=0.0, min_lr=None, lr_init=1.0):
    """Half a cosine (num_cycles 0.5) from 1 to min_lr_rate after a linear warmup from 0."""
    if step < warmup:
        return step / max(1, warmup)
    rate = min_lr / lr_init if min_lr is not None else min_lr_rate
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1 + math.cos(math.pi * num_cycles * 2 * progress)) * (1 - rate) + rate)


def _cosine_with_restarts(step, warmup, total, num_cycles=1):
    """num_cycles hard restarts: each cycle a half cosine from 1 to 0."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.0 if progress >= 1 else max(0.0, 0.5 * (1 + math.cos(math.pi * ((num_cycles * progress) % 1.0))))


def _polynomial(step, warmup, total, power=1.0, lr_end=1e-7, lr_init=1.0):
    """From the base lr to lr_end as (1 - progress)^power; lr_end is absolute, as in transformers."""
    if step < warmup:
        return step / max(1, warmup)
    if step > total:
        return lr_end / lr_init
    remaining = 1 - (step - warmup) / (total - warmup)
    return ((lr_init - lr_end) * remaining**power + lr_end) / lr_init


def _inverse_sqrt(step, warmup, timescale):
    if step < warmup:
        return step / max(1, warmup)
    return 1.0 / math.sqrt((step + timescale - warmup) / timescale)


def _cosine_warmup_with_min_lr(step, warmup, total, num_cycles=0.5, min_lr_rate=0.0, min_lr=None, warmup_lr_rate=None,
                               lr_init=1.0):
    """transformers' variant whose warmup starts at 1/warmup (or warmup_lr_rate) and whose cosine is one step ahead."""
    if step < warmup:
        if warmup_lr_rate is None:
            return (step + 1) / max(1, warmup)
        return warmup_lr_rate + (1 - warmup_lr_rate) * step / max(1, warmup - 1)
    rate = min_lr / lr_init if min_lr is not None else min_lr_rate
    progress = (step - warmup + 1) / max(1, total - warmup)
    return max(0.0, 0.5 * (1 + math.cos(math.pi * num_cycles * 2 * progress)) * (1 - rate) + rate)


_WSD_SHAPES = {"linear": lambda p: p, "cosine": lambda p: 0.5 * (1 - math.cos(math.pi * p)), "1-sqrt": lambda p: 1 - math.sqrt(1 - p)}


def _warmup_stable_decay(step, warmup, stable, decay, warmup_type="linear", decay_type="cosine", min_lr_ratio=0.0,
                         num_cycles=0.5):
    """Warmup from min_lr_ratio, stable at 1, decay to min_lr_ratio; then min_lr_ratio."""
    if step < warmup:
        factor = _WSD_SHAPES[warmup_type](step / max(1, warmup))
    elif step < warmup + stable:
        return 1.0
    elif step < warmup + stable + decay:
        p = (step - warmup - stable) / max(1, decay)
        factor = {"linear": 1 - p, "cosine": 0.5 * (1 + math.cos(math.pi * num_cycles * 2 * p)), "1-sqrt": 1 - math.sqrt(p)}[decay_type]
    else:
        return min_lr_ratio
    return max(0.0, factor * (1 - min_lr_ratio) + min_lr_ratio)


def _piecewise_constant(step, step_rules):
    """diffusers' rules "1:10,0.1:20,0.01": factor 1 before step 10, 0.1 before step 20, then 0.01."""
    *rules, last = step_rules.split(",")
    bounds = sorted((int(steps), float(value)) for value, steps in (rule.split(":") for rule in rules))
    return next((value for bound, value in bounds if step < bound), float(last))


def _rex(step, warmup, total, min_ratio=0.01, rex_alpha=0.1, rex_beta=0.9):
    """Reflected exponential decay (arXiv 2107.04197) as musubi-tuner's RexLR, as a factor of the base lr: a linear
    warmup from min_ratio at step 1 (its step 0 already lies on the curve), then
    min + (1 - min) z / (alpha + beta z), z = the fraction of the post-warmup steps still to go."""
    if warmup == 1 and step == 1:
        return min_ratio
    if warmup > 1 and 1 <= step <= warmup - 1:
        return min_ratio + (1 - min_ratio) * (step - 1) / (warmup - 1)
    after, remaining = step - warmup, total - warmup
    if after >= remaining or after == -1 or remaining <= 0:
        return min_ratio
    z = (remaining - after % remaining) / remaining
    return min_ratio + (1 - min_ratio) * z / (rex_alpha + rex_beta * z)


@dataclass
class ScheduleOptions:
    """musubi-tuner's --lr_* flags beyond the name."""

    warmup: float = 0  # steps, or a fraction of the run when a float below 1
    decay: float = 0  # warmup_stable_decay's decay phase, same units
    num_cycles: int = 1
    power: float = 1.0
    timescale: int | None = None
    min_lr_ratio: float | None = None
    kind: str = ""  # --lr_scheduler_type: a scheduler class (torch.optim.lr_scheduler name or dotted path)
    args: dict = field(default_factory=dict)  # --lr_scheduler_args
    # --lr_warmup_samples / --max_train_samples: the schedule's clock counts samples (step x the global batch)
    warmup_samples: int | None = None
    total_samples: int | None = None
    samples_per_step: int = 0  # the global batch; set by the trainer when either of the above is given

    @property
    def in_samples(self) -> bool:
        return self.warmup_samples is not None or self.total_samples is not None


@dataclass(frozen=True)
class Schedule:
    fn: Callable[..., float]
    # the parameters the flags set (as musubi-tuner's get_lr_scheduler passes them): (options, total, warmup, decay, lr)
    flags: Callable[[ScheduleOptions, int, int, int, float], dict]
    # what --lr_scheduler_args may set, with defaults
    extra: dict = field(default_factory=dict)
    takes_warmup: bool = True
    # whether the formula reads its clock as a continuous time, so it may count samples (Composer's "sp" units)
    # instead of steps; the others are defined on step indices (one-step offsets, rules written in steps)
    continuous: bool = True


def _min_ratio(o: ScheduleOptions, default: float) -> float:
    return default if o.min_lr_ratio is None else o.min_lr_ratio


SCHEDULES: dict[str, Schedule] = {
    "constant": Schedule(_constant, lambda o, t, w, d, lr: {}, takes_warmup=False),
    "constant_with_warmup": Schedule(_constant_with_warmup, lambda o, t, w, d, lr: {"warmup": w}),
    "linear": Schedule(_linear, lambda o, t, w, d, lr: {"warmup": w, "total": t}),
    "cosine": Schedule(_cosine, lambda o, t, w, d, lr: {"warmup": w, "total": t}, {"num_cycles": 0.5}),
    "cosine_with_restarts": Schedule(_cosine_with_restarts, lambda o, t, w, d, lr: {"warmup": w, "total": t, "num_cycles": o.num_cycles}),
    "polynomial": Schedule(_polynomial, lambda o, t, w, d, lr: {"warmup": w, "total": t, "power": o.power, "lr_init": lr},
                           {"lr_end": 1e-7}),
    "inverse_sqrt": Schedule(_inverse_sqrt, lambda o, t, w, d, lr: {"warmup": w, "timescale": o.timescale or w or 10_000}, continuous=False),
    # musubi-tuner passes num_cycles / 2 (one cycle = half a cosine); without a ratio flowtuner ends at 0
    "cosine_with_min_lr": Schedule(_cosine, lambda o, t, w, d, lr: {"warmup": w, "total": t, "num_cycles": o.num_cycles / 2,
                                                                    "min_lr_rate": _min_ratio(o, 0.0), "lr_init": lr},
                                   {"min_lr": None}),
    "cosine_warmup_with_min_lr": Schedule(_cosine_warmup_with_min_lr,
                                          lambda o, t, w, d, lr: {"warmup": w, "total": t, "num_cycles": o.num_cycles / 2,
                                                                  "min_lr_rate": _min_ratio(o, 0.0), "lr_init": lr},
                                          {"min_lr": None, "warmup_lr_rate": None}, continuous=False),
    "warmup_stable_decay": Schedule(_warmup_stable_decay,
                                    lambda o, t, w, d, lr: {"warmup": w, "stable": t - w - d, "decay": d,
                                                            "num_cycles": o.num_cycles / 2, "min_lr_ratio": _min_ratio(o, 0.0)},
                                    {"warmup_type": "linear", "decay_type": "cosine"}),
    "piecewise_constant": Schedule(_piecewise_constant, lambda o, t, w, d, lr: {}, {"step_rules": None}, takes_warmup=False, continuous=False),
    "rex": Schedule(_rex, lambda o, t, w, d, lr: {"warmup": w, "total": t, "min_ratio": _min_ratio(o, 0.01)},
                    {"rex_alpha": 0.1, "rex_beta": 0.9}, continuous=False),
}
# names musubi-tuner lists that cannot run here, and why
REFUSED = {
    "adafactor": "it is Adafactor's own relative step size; flowtuner's adafactor uses --learning_rate "
                 "(relative_step=False), so use --lr_scheduler constant_with_warmup",
    "reduce_lr_on_plateau": "it needs a metric after every step (musubi-tuner fails on it too); use --lr_scheduler_type "
                            "with a scheduler that needs none",
    "greedy": "it needs a metric after every step (musubi-tuner fails on it too)",
}


def warmup_steps(value: float, total: int) -> int:
    """Steps from --lr_warmup_steps / --lr_decay_steps: an int, or a fraction of the run when below 1."""
    return int(value * total) if isinstance(value, float) and 0 < value < 1 else int(value)


def _custom_schedule(opts: ScheduleOptions, optimizer: torch.optim.Optimizer):
    """--lr_scheduler_type: a torch.optim.lr_scheduler class name or a dotted path, built with --lr_scheduler_args."""
    module, _, name = opts.kind.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module) if module else torch.optim.lr_scheduler, name)
    except (ImportError, AttributeError):
        raise ConfigError(f"--lr_scheduler_type {opts.kind}: cannot import it; give a torch.optim.lr_scheduler class "
                          "name or a dotted path.") from None
    try:
        return cls(optimizer, **opts.args)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--lr_scheduler_type {opts.kind} with --lr_scheduler_args {opts.args}: {exc}.") from None


def _check(name: str, params: dict, total: int) -> None:
    """The argument errors transformers / musubi-tuner raise, as one-line ConfigErrors."""
    if name == "polynomial" and not params["lr_init"] > params["lr_end"]:
        raise ConfigError(f"--lr_scheduler polynomial: lr_end {params['lr_end']} must be below --learning_rate {params['lr_init']}.")
    if name == "warmup_stable_decay":
        for key in ("warmup_type", "decay_type"):
            if params[key] not in _WSD_SHAPES:
                raise ConfigError(f"--lr_scheduler_args {key}={params[key]}: use one of {', '.join(_WSD_SHAPES)}.")
    if name == "piecewise_constant" and not params["step_rules"]:
        raise ConfigError("--lr_scheduler piecewise_constant needs --lr_scheduler_args step_rules='1:10,0.1:20,0.01'.")
    if name in ("cosine_with_min_lr", "cosine_warmup_with_min_lr") and params.get("min_lr") is not None \
            and params["min_lr_rate"]:
        raise ConfigError("give either --lr_scheduler_min_lr_ratio or --lr_scheduler_args min_lr, not both.")
    if name == "rex" and params["warmup"] > total:
        raise ConfigError(f"--lr_scheduler rex: {params['warmup']} warmup steps exceed the run's {total}.")


def make_schedule(name: str, optimizer: torch.optim.Optimizer, total: int, opts: ScheduleOptions | None = None):
    """The LR schedule for a run of `total` optimizer steps (musubi-tuner's --lr_scheduler names and flags)."""
    opts = opts or ScheduleOptions()
    if opts.kind:
        return _custom_schedule(opts, optimizer)
    if name in REFUSED:
        raise ConfigError(f"--lr_scheduler {name}: not available: {REFUSED[name]}.")
    if name not in SCHEDULES:
        raise ConfigError(f"--lr_scheduler {name}: unknown; choose one of {', '.join(SCHEDULES)}, or give "
                          "--lr_scheduler_type with a scheduler class.")
    spec, warmup, decay = SCHEDULES[name], warmup_steps(opts.warmup, total), warmup_steps(opts.decay, total)
    if (warmup or opts.warmup_samples) and not spec.takes_warmup:
        hint = "; use constant_with_warmup" if name == "constant" else ""
        flag = "--lr_warmup_samples" if opts.warmup_samples else "--lr_warmup_steps"
        raise ConfigError(f"{flag} has no effect with --lr_scheduler {name}{hint}.")
    clock = 1
    if opts.in_samples:
        total, warmup, decay, clock = _sample_units(name, spec, opts, total, warmup, decay)
    unknown = sorted(set(opts.args) - set(spec.extra))
    if unknown:
        raise ConfigError(f"--lr_scheduler_args {unknown[0]}: not a parameter of {name}; it takes "
                          f"{', '.join(spec.extra) or 'none'}.")
    params = {**spec.flags(opts, total, warmup, decay, optimizer.defaults["lr"]), **spec.extra, **opts.args}
    _check(name, params, total)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: spec.fn(step * clock, **params))


def _sample_units(name: str, spec: Schedule, opts: ScheduleOptions, total: int, warmup: int, decay: int):
    """(total, warmup, decay, samples per step) with the schedule's clock in samples: Composer's
    CosineAnnealingWithWarmupScheduler with t_warmup and max_duration in "sp" evaluates lr(t) at t = the samples
    trained before the step, so the lr of step i is the formula at i x the global batch (a warmup of 1M samples
    at 4096 per step ends mid-step 244, not at a rounded step). Step-valued flags convert at the global batch."""
    batch = opts.samples_per_step
    if batch < 1:
        raise ValueError("samples_per_step must be set (the global batch) when the schedule counts samples")
    if not spec.continuous:
        raise ConfigError(f"--lr_scheduler {name} is defined on step indices; --lr_warmup_samples / --max_train_samples "
                          "work with constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial, "
                          "cosine_with_min_lr and warmup_stable_decay (or give steps).")
    end = opts.total_samples if opts.total_samples is not None else total * batch
    start = opts.warmup_samples if opts.warmup_samples is not None else warmup * batch
    if start > end:
        raise ConfigError(f"--lr_warmup_samples {start} exceeds the run's {end} samples.")
    return end, start, decay * batch, batch


@dataclass(frozen=True)
class GlobalBatch:
    """Samples per optimizer step: the dataset batch_size x --gradient_accumulation_steps x processes (a bucket's
    last micro-batch may be short; the schedule counts it as full, as the nominal batch)."""

    batch_sizes: tuple[int, ...]  # the datasets' batch_size values, distinct, sorted
    accumulation: int
    world: int

    @property
    def samples(self) -> int:
        if len(self.batch_sizes) != 1:
            raise ConfigError(f"--lr_warmup_samples / --max_train_samples need one batch_size across the datasets (found "
                              f"{', '.join(map(str, self.batch_sizes))}); give steps (--lr_warmup_steps, --max_train_steps).")
        return self.batch_sizes[0] * self.accumulation * self.world

    def describe(self) -> str:
        size = "/".join(map(str, self.batch_sizes))
        total = f" = {self.samples}" if len(self.batch_sizes) == 1 else ""
        return (f"global batch {size} (batch_size) x {self.accumulation} (--gradient_accumulation_steps) x {self.world} "
                f"(processes){total} samples per optimizer step")

    def steps(self, samples: int) -> int:
        """Optimizer steps that train `samples` samples (the last one may pass it)."""
        return math.ceil(samples / self.samples)
