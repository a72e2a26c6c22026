"""`flowtuner plan`: the memory one training or generation step needs, found before any weight is read.

The real model code runs at real width on fake tensors (torch FakeTensorMode: shapes and dtypes, no data),
under a tracker that counts every live tensor storage. At the step's peak each live storage is put in a
component: weights, LoRA / trainable weights, optimizer state, gradients, activations (everything else).

torch's own `torch.distributed._tools.mem_tracker.MemTracker` (torch 2.13) cannot be used: it registers
a gradient hook on every parameter of every module it sees, which raises for the frozen base of a LoRA
run ("cannot register a hook on a tensor that doesn't require gradient"). `LiveStorages` below does the
part the planner needs (live bytes, the peak, what was alive then).

Memory options: `--gradient_checkpointing_cpu_offload` is traced with the real offload wrapper whose host copies
the tracker counts as host bytes (not device); `--blocks_to_swap` is applied to the traced weights afterwards:
only `resident_blocks` blocks' weights are on the device, the swapped ones in host memory ("swap_buffers").

A real-width DiT with dozens of blocks is slow to trace on a CPU, so the model is traced with 1 and 2
blocks and every component at the peak is extrapolated linearly to the real block count (each one is a
per-block cost plus a fixed one). Shared code: the family says what to build (`Family.plan_spec`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from flowtuner.errors import ConfigError
from flowtuner.train.offload import ActivationOffload, check_offload_flags

GIB = 1024**3
TRACED_BLOCKS = (1, 2)
# with the activations offloaded, the first traced block sees no host copy (the last block's outputs stay on
# the device) and the second's recomputation brings its input back: the steady state starts at 2 blocks
TRACED_BLOCKS_OFFLOAD = (2, 3)
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
    # generate: models run before / after the DiT -> bytes; a function, as sizing them costs seconds (the published
    # text encoder is built on the meta device) and only generation needs them
    other_models: Callable[[], dict[str, int]] = dict
    fp8_targets: Callable[[nn.Module], set[str]] | None = None  # the Linears --fp8_base stores in fp8
    blocks_path: str = ""  # the denoiser's block list (checkpointed, offloaded, swapped); the family gives it
    split_attention: Callable[[nn.Module], None] | None = None  # installs --split_attn's per-sample attention


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
    fp8_scaled: bool = False  # --fp8_scaled: the fp8 Linears carry their scale buffers too
    gradient_checkpointing_cpu_offload: bool = False
    blocks_to_swap: int = 0
    block_swap_ring_size: int = 2
    split_attn: bool = False


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
        self.sizes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # storage -> [bytes, on the host]
        self.live = 0
        self.peak = 0
        self.at_peak: list[tuple[weakref.ref, int]] = []
        self.host_live = 0  # bytes of storages put on the host (`on_host`): not device memory
        self.host_peak = 0
        self._host = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        grew = False
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                grew |= self._add(t.untyped_storage())
        if grew and self.live > self.peak:
            self.peak = self.live
            self.at_peak = self._snapshot()
        return out

    def _add(self, storage) -> bool:
        if storage in self.sizes:
            return False
        cell = [storage.nbytes(), self._host]
        self.sizes[storage] = cell
        weakref.finalize(storage, self._free, cell)
        if self._host:
            self.host_live += cell[0]
            self.host_peak = max(self.host_peak, self.host_live)
            return False
        self.live += cell[0]
        return cell[0] > 0

    def _free(self, cell: list) -> None:
        if cell[1]:
            self.host_live -= cell[0]
        else:
            self.live -= cell[0]

    @contextmanager
    def on_host(self):
        """Storages created inside live in host memory (an offload's copies): counted apart from the device."""
        self._host = True
        try:
            yield
        finally:
            self._host = False

    def is_host(self, t: torch.Tensor) -> bool:
        cell = self.sizes.get(t.untyped_storage())
        return cell is not None and cell[1]

    def _snapshot(self) -> list[tuple[weakref.ref, int]]:
        return [(weakref.ref(s), n) for s, (n, host) in self.sizes.items() if not host]

    def restart_peak(self) -> None:
        """Forget the peak so far (what is alive now stays counted)."""
        self.peak = self.live
        self.at_peak = self._snapshot()

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
    """Bytes by component at the peak of one step of a `blocks`-block model; fake tensors, CPU device. The host
    bytes of an activation offload come as `offloaded_activations` (their own peak)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    tracker = LiveStorages()
    with FakeTensorMode(), tracker:
        run = _STEPS[s.mode]
        classify = run(spec, s, blocks, tracker)
    out = tracker.peak_by(classify)
    if tracker.host_peak:
        out["offloaded_activations"] = tracker.host_peak
    return out


class TracedOffload(ActivationOffload):
    """The activation offload where device and host are one memory (a trace, or a CPU measurement): the host copy
    is made explicitly and counted as host bytes by the tracker; coming back to the device is a copy again."""

    def __init__(self, tracker: LiveStorages, blocks, device="cpu"):
        super().__init__(blocks, device, device)
        self.tracker = tracker

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        if self.tracker.is_host(t):
            return t
        with self.tracker.on_host():
            return t.clone()

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.clone() if self.tracker.is_host(t) else t


def _memory_options(spec: PlanSpec, s: PlanSettings, model: nn.Module, tracker: LiveStorages) -> None:
    """Gradient checkpointing (its activations offloaded or not) and split attention, as the trainer sets them."""
    if s.split_attn:
        spec.split_attention(model)
    if s.gradient_checkpointing:
        blocks = model.get_submodule(spec.blocks_path)
        model.enable_gradient_checkpointing(TracedOffload(tracker, blocks) if s.gradient_checkpointing_cpu_offload else None)


def _build(spec: PlanSpec, s: PlanSettings, blocks: int, tracker: LiveStorages) -> nn.Module:
    dtype = (torch.bfloat16 if s.full_bf16 else torch.float32) if s.mode == "finetune" else spec.dtype
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: a .to() after the build would hold both copies
    try:
        model = spec.build(blocks)
    finally:
        torch.set_default_dtype(default)
    if s.fp8_base:
        from flowtuner.weights.fp8 import SCALED_DEFAULT, quantise_module

        quantise_module(model, _Targets(spec.fp8_targets), SCALED_DEFAULT if s.fp8_scaled else None)
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


def _settle(optimizer, params) -> None:
    """One optimizer step on zero gradients, then the gradients dropped: the step every run repeats after its
    first has the optimizer state alive through forward and backward (a first step creates it only after the
    backward peak; planning that one missed AdamW's 2x LoRA bytes, measured on an H200: docs/memory.md)."""
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _train_step(spec: PlanSpec, s: PlanSettings, blocks: int, tracker: LiveStorages):
    """The training step as train/loop.py runs it: LoRA (or all weights), autocast, loss, backward, clipping,
    optimizer step."""
    from flowtuner.train.lora import LoRANetwork, select_modules
    from flowtuner.train.objective import per_sample_loss
    from flowtuner.train.optim import make_optimizer

    model = _build(spec, s, blocks, tracker).train()
    full = s.mode == "finetune"
    model.requires_grad_(full)
    _memory_options(spec, s, model, tracker)
    denoiser = spec.denoiser(model)
    network = None
    if not full:
        paths = select_modules(model, spec.lora_targets(model), [], [])
        network = LoRANetwork(model, paths, s.network_dim, s.network_alpha).attach()
    params = [p for p in (model if full else network).parameters() if p.requires_grad]
    traced, _ = OPTIMIZERS[s.optimizer]
    optimizer = make_optimizer(traced, params, 1e-4, {})
    _settle(optimizer, params)
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
    if s.split_attn:
        spec.split_attention(model)
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
    host_components: dict[str, int]  # host bytes of the step by component (block swap, activation offload)
    phases: dict[str, int]  # generate: device bytes of each model's phase
    settings: dict
    notes: list[str]

    def as_json(self) -> dict:
        return {"device_peak_gib": _gib(self.device_peak), "host_peak_gib": _gib(self.host_peak),
                "components": {k: _gib(v) for k, v in self.components.items()},
                "host_components": {k: _gib(v) for k, v in self.host_components.items()},
                "phases": {k: _gib(v) for k, v in self.phases.items()}, "settings": self.settings, "notes": self.notes}

    def text(self) -> str:
        s = self.settings
        head = (f"{s['model']} ({s['source']}), {s['mode']} step at {s['height']}x{s['width']}, batch {s['batch']}, "
                f"{s['text_tokens']} text tokens")
        rows = [f"  {name:<26}{_gib(v):>9.2f} GiB" for name, v in self.components.items()]
        phases = [f"  phase {name:<20}{_gib(v):>9.2f} GiB" for name, v in self.phases.items()]
        host = [f"  {name:<26}{_gib(v):>9.2f} GiB" for name, v in self.host_components.items()]
        return "\n".join([head, f"peak device memory {_gib(self.device_peak):.2f} GiB:", *rows, *phases,
                          f"peak host memory {_gib(self.host_peak):.2f} GiB" + (":" if host else ""), *host,
                          *(f"note: {n}" for n in self.notes)])

    def compact(self) -> str:
        """One block for a command's start: the peaks and the main components."""
        dev = ", ".join(f"{k} {_gib(v):.2f}" for k, v in self.components.items() if v >= GIB // 100)
        host = ", ".join(f"{k} {_gib(v):.2f}" for k, v in self.host_components.items())
        return (f"memory plan ({self.settings['height']}x{self.settings['width']}, batch {self.settings['batch']}, "
                f"{self.settings['text_tokens']} text tokens): device peak {_gib(self.device_peak):.2f} GiB ({dev}); "
                f"host peak {_gib(self.host_peak):.2f} GiB" + (f" ({host})" if host else ""))


def _gib(n: int) -> float:
    return round(n / GIB, 3)


def extrapolate(at: dict[int, dict[str, int]], blocks: int) -> dict[str, int]:
    """Each component linear in the block count, through the two traced counts."""
    a, b = sorted(at)
    names = sorted(set(at[a]) | set(at[b]))
    out = {}
    for name in names:
        lo, hi = at[a].get(name, 0), at[b].get(name, 0)
        out[name] = max(0, round(lo + (hi - lo) * (blocks - a) / (b - a)))
    return out


ORDER = ("weights", "lora", "optimizer_state", "gradients", "activations")
HOST = ("swap_buffers", "offloaded_activations")  # host components of the step (not device memory)


def train_settings(cfg, mode: str, height: int, width: int, batch: int, text_tokens: int) -> PlanSettings:
    """The planned step of a `train` / `finetune` configuration (config/train.py's TrainConfig)."""
    if cfg.fused_backward_pass:  # gradients would exist one at a time: a step the planner does not trace yet
        raise ConfigError("--fused_backward_pass: the plan does not model it yet; plan without it (every gradient "
                          "then counts at once, an upper bound).")
    return PlanSettings(mode, height, width, batch, text_tokens, mixed_precision=cfg.mixed_precision,
                        gradient_checkpointing=cfg.gradient_checkpointing, network_dim=cfg.network_dim,
                        network_alpha=cfg.network_alpha, optimizer=cfg.optimizer_type.lower(), full_bf16=cfg.full_bf16,
                        max_grad_norm=cfg.max_grad_norm, fp8_base=cfg.fp8_base, fp8_scaled=cfg.fp8_scaled,
                        gradient_checkpointing_cpu_offload=cfg.gradient_checkpointing_cpu_offload,
                        blocks_to_swap=cfg.blocks_to_swap, block_swap_ring_size=cfg.block_swap_ring_size,
                        split_attn=cfg.split_attn)


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
    if s.mode != "generate":
        check_offload_flags(s.gradient_checkpointing, s.gradient_checkpointing_cpu_offload)
    if s.split_attn and spec.split_attention is None:
        raise ConfigError(f"--split_attn: {spec.model} has no per-sample attention; plan without it.")
    from flowtuner.weights.block_swap import check_blocks_to_swap

    check_blocks_to_swap(spec.num_blocks, s.blocks_to_swap, s.block_swap_ring_size)
    if s.blocks_to_swap and s.mode == "finetune":
        raise ConfigError("--blocks_to_swap: full fine-tuning trains the block weights, which swapping keeps as frozen "
                          "host copies (finetune refuses it); plan without it.")


def _swap(at: dict[int, dict[str, int]], s: PlanSettings, num_blocks: int) -> tuple[int, int]:
    """(device bytes of block weights no longer on the device, host bytes of the swapped blocks' weights)."""
    from flowtuner.weights.block_swap import resident_blocks

    a, b = sorted(at)
    per_block = (at[b].get("weights", 0) - at[a].get("weights", 0)) / (b - a)
    resident = resident_blocks(num_blocks, s.blocks_to_swap, s.block_swap_ring_size)
    return round((num_blocks - resident) * per_block), round(s.blocks_to_swap * per_block)


def make_plan(spec: PlanSpec, s: PlanSettings) -> Plan:
    check(s, spec)
    traced = TRACED_BLOCKS_OFFLOAD if s.gradient_checkpointing_cpu_offload and s.mode != "generate" else TRACED_BLOCKS
    at = {n: trace(spec, s, n) for n in traced}
    comps = extrapolate(at, spec.num_blocks)
    _, factor = OPTIMIZERS[s.optimizer]
    if "optimizer_state" in comps:
        comps["optimizer_state"] = round(comps["optimizer_state"] * factor)
    host_comps = {k: comps[k] for k in HOST if comps.get(k)}
    comps = {k: comps[k] for k in ORDER if k in comps}
    # the loaders materialise each model on the host in its stored dtype, then move it to the device
    dit_file = comps.get("weights", 0) + comps.get("lora", 0) if s.mode != "finetune" else \
        round(comps.get("weights", 0) * spec.dtype.itemsize / (2 if s.full_bf16 else 4))
    if s.blocks_to_swap:
        off_device, host_comps["swap_buffers"] = _swap(at, s, spec.num_blocks)
        comps["weights"] -= off_device
    dit = sum(comps.values())
    others = spec.other_models() if s.mode == "generate" else {}
    phases = {"dit": dit, **others} if others else {}
    device = max([dit, *others.values()])
    host = max([dit_file, sum(host_comps.values()), *others.values()])
    notes = [f"traced with {traced[0]} and {traced[1]} real-width blocks on fake tensors; each component "
             f"extrapolated linearly to {spec.num_blocks} blocks",
             "host peak: the model being loaded, materialised on the host before it moves to the device, or the step's "
             "host components when larger"]
    if s.blocks_to_swap:
        notes.append(f"block swap: {s.blocks_to_swap} blocks' weights live in host memory; the device holds the others "
                     "plus the transfer buffers (resident_blocks)")
    if s.gradient_checkpointing_cpu_offload and s.mode != "generate":
        notes.append("activation offload: the checkpointed blocks' inputs live in host memory (offloaded_activations)")
    if s.mode == "generate":
        notes.append("text encoder and VAE phases count their weights only (their activations are not traced)")
    if s.optimizer == "adamw8bit":
        notes.append("adamw8bit state sized as bitsandbytes stores it (1 byte per value + a float32 absmax per 256)")
    settings = {"model": spec.model, "source": spec.source, "blocks": spec.num_blocks, "weights_dtype": str(spec.dtype)[6:],
                **asdict(s)}
    if s.mode == "generate":
        for key in ("mixed_precision", "gradient_checkpointing", "network_dim", "network_alpha", "optimizer", "full_bf16",
                    "max_grad_norm", "gradient_checkpointing_cpu_offload", "split_attn"):
            settings.pop(key)
    elif s.mode == "finetune":
        settings.pop("network_dim"), settings.pop("network_alpha")
    return Plan(device, host, comps, host_comps, phases, settings, notes)


STARTUP_TEXT_TOKENS = 256  # captions vary; the same default as `flowtuner plan --text_tokens`
# devices whose runs plan at start: a plan costs 2-5 s of CPU time whatever the model size (fake-tensor dispatch of
# every op), worth it before a long accelerator run; a CPU run has no device memory to fit and is a test or a demo
STARTUP_DEVICES = ("cuda",)


def startup_plan(family, paths, cfg, mode: str, device: torch.device) -> Plan | None:
    """`train` / `finetune` at start on an accelerator: plan one step of the first dataset's size, print it in one
    block, and warn in one line when the device is smaller than the planned peak. Settings the plan cannot model
    skip it (one line)."""
    import logging

    from flowtuner.data.config import load_dataset_config

    if device.type not in STARTUP_DEVICES:
        return None
    log = logging.getLogger("flowtuner.plan")
    first = load_dataset_config(cfg.dataset_config)[0]
    step = family.size_step
    (w, h), batch = first.resolution, first.batch_size
    try:
        settings = train_settings(cfg, mode, max(step, h // step * step), max(step, w // step * step), batch,
                                  STARTUP_TEXT_TOKENS)
        plan = make_plan(family.plan_spec(paths), settings)
    except ConfigError as exc:
        log.info("memory plan skipped: %s", exc)
        return None
    log.info("%s", plan.compact())
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        if plan.device_peak > total:
            log.warning("the planned device peak (%.2f GiB) exceeds %s's %.2f GiB: expect out-of-memory; see `flowtuner "
                        "plan` and docs/memory.md for the options that lower it.", plan.device_peak / GIB, device,
                        total / GIB)
    return plan
