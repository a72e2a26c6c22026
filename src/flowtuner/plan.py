"""`flowtuner plan`: the memory one training or generation step needs, found before any weight is read.

The real model code runs at real width on fake tensors (torch FakeTensorMode: shapes and dtypes, no data),
under a tracker that counts every live tensor storage. At the step's peak each live storage is put in a
component: weights, LoRA / trainable weights, optimizer state, gradients, activations (everything else).

torch's own `torch.distributed._tools.mem_tracker.MemTracker` (torch 2.13) cannot be used: it registers
a gradient hook on every parameter of every module it sees, which raises for the frozen base of a LoRA
run ("cannot register a hook on a tensor that doesn't require gradient"). `LiveStorages` below does the
part the planner needs (live bytes, the peak, what was alive then).

A real-width DiT with dozens of blocks is slow to trace on a CPU, so the model is traced with 1 and 2
blocks and every component at the peak is extrapolated linearly to the real block count (each one is a
per-block cost plus a fixed one). Shared code: the family says what to build (`Family.plan_spec`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from flowtuner.errors import ConfigError

GIB = 1024**3
TRACED_BLOCKS = (1, 2)
MODES = ("train", "finetune", "generate")
PRECISIONS = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class PlanSpec:
    """What a family tells the planner about one model (from published sizes or from file headers)."""

    model: str  # for the output: which model and where its sizes came from
    source: str
    num_blocks: int
    dtype: torch.dtype  # the DiT's weights as loaded
    build: Callable[[int], nn.Module]  # the DiT with n blocks at real width, parameters in the default dtype
    denoiser: Callable[[nn.Module], object]  # the family's Denoiser around a built DiT (its real `predict`)
    lora_targets: Callable[[nn.Module], list[str]]  # the LoRA's default modules in a built DiT
    text_width: int  # the conditioning's feature width
    other_models: dict[str, int] = field(default_factory=dict)  # generate: models run before / after the DiT, bytes
    fp8_targets: Callable[[nn.Module], set[str]] | None = None  # the Linears --fp8_base stores in fp8


@dataclass
class PlanSettings:
    mode: str  # train | finetune | generate
    height: int
    width: int
    batch: int
    text_tokens: int
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    network_dim: int = 4
    network_alpha: float = 1.0
    optimizer: str = "adamw"
    full_bf16: bool = False
    max_grad_norm: float = 1.0
    fp8_base: bool = False


# optimizer -> (the optimizer traced, factor on its state bytes): bitsandbytes cannot run on fake tensors, so
# AdamW8bit is traced as AdamW and its state sized as bitsandbytes stores it: per moment one byte per value
# plus one float32 absmax per block of 256 values (fp32 parameters: (1 + 4/256) / 4 of AdamW's)
OPTIMIZERS: dict[str, tuple[str, float]] = {
    "adamw": ("adamw", 1.0),
    "adamw8bit": ("adamw", (1 + 4 / 256) / 4),
    "adafactor": ("adafactor", 1.0),
}


class LiveStorages(TorchDispatchMode):
    """Counts the bytes of every storage an op creates until it is freed; keeps what was alive at the peak."""

    def __init__(self):
        super().__init__()
        self.sizes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.live = 0
        self.peak = 0
        self.at_peak: list[tuple[weakref.ref, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        grew = False
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                grew |= self._add(t.untyped_storage())
        if grew and self.live > self.peak:
            self.peak = self.live
            self.at_peak = [(weakref.ref(s), n) for s, n in self.sizes.items()]
        return out

    def _add(self, storage) -> bool:
        if storage in self.sizes:
            return False
        n = storage.nbytes()
        self.sizes[storage] = n
        self.live += n
        weakref.finalize(storage, self._free, n)
        return n > 0

    def _free(self, n: int) -> None:
        self.live -= n

    def restart_peak(self) -> None:
        """Forget the peak so far (what is alive now stays counted)."""
        self.peak = self.live
        self.at_peak = [(weakref.ref(s), n) for s, n in self.sizes.items()]

    def peak_by(self, classify: Callable[[object], str]) -> dict[str, int]:
        """Bytes alive at the peak by component; storages freed since are activations / temporaries."""
        out: dict[str, int] = {}
        for ref, n in self.at_peak:
            s = ref()
            kind = classify(s) if s is not None else "activations"
            out[kind] = out.get(kind, 0) + n
        return out


def _storages(tensors) -> set:
    return {t.untyped_storage() for t in tensors if isinstance(t, torch.Tensor)}


def _optimizer_tensors(optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def trace(spec: PlanSpec, s: PlanSettings, blocks: int) -> dict[str, int]:
    """Bytes by component at the peak of one step of a `blocks`-block model; fake tensors, CPU device."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    tracker = LiveStorages()
    with FakeTensorMode(), tracker:
        run = _STEPS[s.mode]
        classify = run(spec, s, blocks, tracker)
    return tracker.peak_by(classify)


def _build(spec: PlanSpec, s: PlanSettings, blocks: int, tracker: LiveStorages) -> nn.Module:
    dtype = (torch.bfloat16 if s.full_bf16 else torch.float32) if s.mode == "finetune" else spec.dtype
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: a .to() after the build would hold both copies
    try:
        model = spec.build(blocks)
    finally:
        torch.set_default_dtype(default)
    if s.fp8_base:
        from flowtuner.weights.fp8 import quantise_module

        quantise_module(model, _Targets(spec.fp8_targets))
        # the loader quantises tensor by tensor as the file streams in: the high-precision model built here for
        # the trace never exists in a real run, so its moment is not the step's peak
        tracker.restart_peak()
    return model


class _Targets:
    """An fp8 policy from the family's target function (quantise_module's interface)."""

    def __init__(self, fn):
        self.targets = fn


def _inputs(spec: PlanSpec, s: PlanSettings, denoiser):
    from flowtuner.families.base import Conditioning

    geometry = denoiser.geometry(s.height, s.width)
    shape = (s.batch,) + tuple(geometry.state_shape[1:])
    cond = Conditioning(torch.zeros(s.batch, s.text_tokens, spec.text_width))
    return torch.zeros(shape), torch.randn(shape), torch.full((s.batch,), 0.5), cond, geometry


def _train_step(spec: PlanSpec, s: PlanSettings, blocks: int, tracker: LiveStorages):
    """The training step as train/loop.py runs it: LoRA (or all weights), autocast, loss, backward, clipping,
    optimizer step."""
    from flowtuner.train.lora import LoRANetwork, select_modules
    from flowtuner.train.objective import per_sample_loss
    from flowtuner.train.optim import make_optimizer

    model = _build(spec, s, blocks, tracker).train()
    full = s.mode == "finetune"
    model.requires_grad_(full)
    if s.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    denoiser = spec.denoiser(model)
    network = None
    if not full:
        paths = select_modules(model, spec.lora_targets(model), [], [])
        network = LoRANetwork(model, paths, s.network_dim, s.network_alpha).attach()
    params = [p for p in (model if full else network).parameters() if p.requires_grad]
    traced, _ = OPTIMIZERS[s.optimizer]
    optimizer = make_optimizer(traced, params, 1e-4, {})
    x0, noise, sigma, cond, geometry = _inputs(spec, s, denoiser)
    dtype = PRECISIONS[s.mixed_precision]
    autocast = torch.autocast("cpu", dtype=dtype) if dtype is not None else nullcontext()
    with autocast:
        loss = per_sample_loss(lambda *a: denoiser.predict(*a), x0, noise, sigma, cond, geometry).mean()
    loss.backward()
    if s.max_grad_norm:
        nn.utils.clip_grad_norm_(params, s.max_grad_norm)
    optimizer.step()
    trainable, grads = _storages(params), _storages(p.grad for p in params)
    state = _storages(_optimizer_tensors(optimizer))
    weights = _storages(model.parameters()) | _storages(model.buffers())

    def classify(storage) -> str:
        if storage in grads:
            return "gradients"
        if storage in state:
            return "optimizer_state"
        if storage in trainable and not full:
            return "lora"
        if storage in weights:
            return "weights"
        return "activations"

    return classify


def _generate_step(spec: PlanSpec, s: PlanSettings, blocks: int, tracker: LiveStorages):
    """One denoiser call as generation runs it (no autograd; CFG runs its two passes one after the other)."""
    model = _build(spec, s, blocks, tracker).eval().requires_grad_(False)
    denoiser = spec.denoiser(model)
    x, _, sigma, cond, geometry = _inputs(spec, s, denoiser)
    with torch.no_grad():
        denoiser.predict(x, sigma, cond, geometry)
    weights = _storages(model.parameters()) | _storages(model.buffers())
    return lambda storage: "weights" if storage in weights else "activations"


_STEPS = {"train": _train_step, "finetune": _train_step, "generate": _generate_step}


@dataclass
class Plan:
    device_peak: int
    host_peak: int
    components: dict[str, int]  # device bytes at the peak, by component
    phases: dict[str, int]  # generate: device bytes of each model's phase
    settings: dict
    notes: list[str]

    def as_json(self) -> dict:
        return {"device_peak_gib": _gib(self.device_peak), "host_peak_gib": _gib(self.host_peak),
                "components": {k: _gib(v) for k, v in self.components.items()},
                "phases": {k: _gib(v) for k, v in self.phases.items()}, "settings": self.settings, "notes": self.notes}

    def text(self) -> str:
        s = self.settings
        head = (f"{s['model']} ({s['source']}), {s['mode']} step at {s['height']}x{s['width']}, batch {s['batch']}, "
                f"{s['text_tokens']} text tokens")
        rows = [f"  {name:<26}{_gib(v):>9.2f} GiB" for name, v in self.components.items()]
        phases = [f"  phase {name:<20}{_gib(v):>9.2f} GiB" for name, v in self.phases.items()]
        return "\n".join([head, f"peak device memory {_gib(self.device_peak):.2f} GiB:", *rows, *phases,
                          f"peak host memory {_gib(self.host_peak):.2f} GiB", *(f"note: {n}" for n in self.notes)])


def _gib(n: int) -> float:
    return round(n / GIB, 3)


def extrapolate(at: dict[int, dict[str, int]], blocks: int) -> dict[str, int]:
    """Each component linear in the block count, through the two traced counts."""
    a, b = TRACED_BLOCKS
    names = sorted(set(at[a]) | set(at[b]))
    out = {}
    for name in names:
        lo, hi = at[a].get(name, 0), at[b].get(name, 0)
        out[name] = max(0, round(lo + (hi - lo) * (blocks - a) / (b - a)))
    return out


ORDER = ("weights", "lora", "optimizer_state", "gradients", "activations")


def check(s: PlanSettings, spec: PlanSpec) -> None:
    if s.mode not in MODES:
        raise ConfigError(f"flowtuner plan {s.mode}: unknown; plan one of {', '.join(MODES)}.")
    if s.optimizer not in OPTIMIZERS:
        raise ConfigError(f"--optimizer_type {s.optimizer}: the plan knows {', '.join(OPTIMIZERS)}; plan with one of them.")
    if s.mixed_precision not in PRECISIONS:
        raise ConfigError(f"--mixed_precision {s.mixed_precision}: choose one of {', '.join(PRECISIONS)}.")
    for name, value in (("batch size", s.batch), ("text tokens", s.text_tokens), ("--network_dim", s.network_dim)):
        if value < 1:
            raise ConfigError(f"{name} {value}: must be at least 1.")
    if s.full_bf16 and s.mode == "finetune" and s.mixed_precision != "bf16":
        raise ConfigError("--full_bf16 needs --mixed_precision bf16.")
    if s.fp8_base and s.mode == "finetune":
        raise ConfigError("--fp8_base: full fine-tuning cannot train fp8 weights (finetune refuses it); plan without it.")
    if s.fp8_base and spec.fp8_targets is None:
        raise ConfigError(f"--fp8_base: {spec.model} has no fp8 layer policy; plan without it.")


def make_plan(spec: PlanSpec, s: PlanSettings) -> Plan:
    check(s, spec)
    at = {n: trace(spec, s, n) for n in TRACED_BLOCKS}
    comps = extrapolate(at, spec.num_blocks)
    _, factor = OPTIMIZERS[s.optimizer]
    if "optimizer_state" in comps:
        comps["optimizer_state"] = round(comps["optimizer_state"] * factor)
    comps = {k: comps[k] for k in ORDER if k in comps}
    dit = sum(comps.values())
    phases = {"dit": dit, **spec.other_models} if s.mode == "generate" and spec.other_models else {}
    device = max([dit, *spec.other_models.values()]) if s.mode == "generate" else dit
    # the loaders materialise each model on the host in its stored dtype, then move it to the device
    dit_file = comps.get("weights", 0) + comps.get("lora", 0) if s.mode != "finetune" else \
        round(comps.get("weights", 0) * spec.dtype.itemsize / (2 if s.full_bf16 else 4))
    host = max([dit_file, *(spec.other_models.values() if s.mode == "generate" else ())])
    notes = [f"traced with {TRACED_BLOCKS[0]} and {TRACED_BLOCKS[1]} real-width blocks on fake tensors; each component "
             f"extrapolated linearly to {spec.num_blocks} blocks",
             "host peak: the model being loaded, materialised on the host before it moves to the device"]
    if s.mode == "generate":
        notes.append("text encoder and VAE phases count their weights only (their activations are not traced)")
    if s.optimizer == "adamw8bit":
        notes.append("adamw8bit state sized as bitsandbytes stores it (1 byte per value + a float32 absmax per 256)")
    settings = {"model": spec.model, "source": spec.source, "blocks": spec.num_blocks, "weights_dtype": str(spec.dtype)[6:],
                **asdict(s)}
    if s.mode == "generate":
        for key in ("mixed_precision", "gradient_checkpointing", "network_dim", "network_alpha", "optimizer", "full_bf16",
                    "max_grad_norm"):
            settings.pop(key)
    elif s.mode == "finetune":
        settings.pop("network_dim"), settings.pop("network_alpha")
    return Plan(device, host, comps, phases, settings, notes)
