"""Block swap (`--blocks_to_swap S`): of a model's N blocks, S keep their frozen weights in host memory and
stream them into a small ring of device buffers just before they run, forward and backward.

Design (docs/memory.md "Block swap"):
- Host -> device only. The host copy of a streamed block is its master (pinned when the device is CUDA; one
  flat byte buffer per block, so a load is one copy); a ring slot on the device is a scratch buffer that is
  overwritten by the next block using it. Nothing is ever copied back: the weights are frozen. Trainable
  parameters (a LoRA, wherever it sits) stay on the device and are never streamed; a block with trainable
  weights is refused (full fine-tuning would need device -> host copies of weights and gradients).
- The S streamed blocks are spread evenly over the N (so each load has several blocks of compute to hide
  behind). Streamed rank r always uses slot r % ring_size.
- Forward: before block k runs it waits for its load; after it ran, the block `ring_size` ranks ahead is
  loaded into the slot it used (on a side CUDA stream, gated on an event, so the copy overlaps compute).
  Without grad (sampling) the last streamed block wraps around and preloads ranks 0.. for the next call;
  with grad the last ring_size blocks stay loaded, being the first the backward needs.
- Backward: a gradient hook on each block's outputs fires first in the block's backward. When block k's gradient arrives, every streamed block above k
  has finished its backward (autograd runs later-created nodes first), so their slots are reloaded with the
  ranks `ring_size` below; block k waits for its own load. With gradient checkpointing the recomputation runs
  through the forward pre-hook, which only makes sure the block is loaded. Without it, the weights autograd
  saves for input gradients are packed (saved-tensor hooks) as a reference to the block, not to the slot's
  memory, and unpacked from wherever the block is loaded at that time: this is what makes the ring safe for
  backward (diffusers' group offload is not: it reloads nothing for backward).
- On the CPU the same schedule runs with host "device" slots and synchronous copies, so the CPU tests check the
  real order and the results of computing from the ring copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import logging

import torch
from torch import nn

from flowtuner.errors import ConfigError

log = logging.getLogger(__name__)
ALIGN = 256  # byte alignment of each weight inside a flat buffer (any dtype view is valid)


def check_blocks_to_swap(num_blocks: int, blocks_to_swap: int, ring_size: int = 2) -> None:
    """One line for a count the model cannot take."""
    if blocks_to_swap < 0:
        raise ConfigError(f"--blocks_to_swap {blocks_to_swap}: must be 0 or more.")
    if blocks_to_swap >= num_blocks:
        raise ConfigError(f"--blocks_to_swap {blocks_to_swap}: the DiT has {num_blocks} blocks; at most "
                          f"{num_blocks - 1} can be swapped (one block must stay on the device).")
    if ring_size < 1:
        raise ConfigError(f"--block_swap_ring_size {ring_size}: must be 1 or more (2 overlaps loading and compute).")


def resident_blocks(num_blocks: int, blocks_to_swap: int, ring_size: int = 2) -> int:
    """Blocks' worth of weights on the device at the peak: the blocks that never move plus the ring slots."""
    check_blocks_to_swap(num_blocks, blocks_to_swap, ring_size)
    return num_blocks - blocks_to_swap + min(ring_size, blocks_to_swap)


def streamed_indices(num_blocks: int, blocks_to_swap: int) -> list[int]:
    """`blocks_to_swap` block indices spread evenly (the middle of each of S equal spans; distinct for S < N)."""
    return [((2 * i + 1) * num_blocks) // (2 * blocks_to_swap) for i in range(blocks_to_swap)]


def _layout(tensors: list[torch.Tensor]) -> tuple[list[int], int]:
    offsets, total = [], 0
    for t in tensors:
        total = -(-total // ALIGN) * ALIGN
        offsets.append(total)
        total += t.numel() * t.element_size()
    return offsets, -(-total // ALIGN) * ALIGN


def _view(flat: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    return flat[offset: offset + like.numel() * like.element_size()].view(like.dtype).view(like.shape)


@dataclass
class _Streamed:
    """One streamed block: its frozen parameters, their master views in the host buffer and their layout."""

    index: int
    params: list[nn.Parameter]
    offsets: list[int]
    host: torch.Tensor  # flat uint8, pinned on CUDA
    masters: list[torch.Tensor]


class BlockSwap:
    """Streams the frozen weights of `blocks_to_swap` of `blocks` through `ring_size` device buffers.
    `trace`: set it to a list to record the schedule as (event, block, slot) tuples ("load", "forward",
    "backward", "unpack"); None (the default) records nothing. `poison_evicted` (tests): evicted weights point at
    NaN copies instead of their host masters, so on the CPU a use of an unloaded block shows (a GPU would fail on
    the device mismatch) instead of silently computing from the host copy."""

    poison_evicted = False

    def __init__(self, blocks: nn.ModuleList, blocks_to_swap: int, device: torch.device | str, ring_size: int = 2):
        n = len(blocks)
        check_blocks_to_swap(n, blocks_to_swap, ring_size)
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.blocks = blocks
        self.trace: list | None = None
        self.order = streamed_indices(n, blocks_to_swap)
        self.rank = {b: r for r, b in enumerate(self.order)}
        self.ring_size = min(ring_size, blocks_to_swap)
        self.streamed = {b: self._pack(b) for b in self.order}
        size = max((s.host.numel() for s in self.streamed.values()), default=0)
        # one allocation per slot: a load bumps only its own slot's autograd version counter
        self.slots = [torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(self.ring_size)]
        self.slot_of_storage = {t.untyped_storage().data_ptr(): i for i, t in enumerate(self.slots)}
        self.in_slot: list[int | None] = [None] * self.ring_size
        self.ready: list = [None] * self.ring_size
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.pending: list[int] = []  # streamed blocks whose backward began and whose slot is not reused yet
        self.handles = []
        for k, block in enumerate(blocks):
            self.handles += [block.register_forward_pre_hook(self._pre_forward(k)),
                             block.register_forward_hook(self._post_forward(k), always_call=True)]
        self._hooks: list = []
        for r in range(self.ring_size):
            self._load(self.order[r])

    # ---------------------------------------------------------------- setup
    def _pack(self, index: int) -> _Streamed:
        """Move the block's frozen parameters into one flat host buffer (their master from now on)."""
        block = self.blocks[index]
        trainable = [name for name, p in block.named_parameters() if p.requires_grad]
        if trainable:
            raise ConfigError(f"--blocks_to_swap: block {index} has trainable weights (e.g. {trainable[0]}); block swap "
                              "streams frozen weights only (LoRA training, generation), not full fine-tuning.")
        params = list(block.parameters())
        offsets, total = _layout(params)
        host = torch.empty(total, dtype=torch.uint8)
        if self.cuda:
            host = host.pin_memory()
        masters = []
        for p, off in zip(params, offsets):
            view = _view(host, off, p)
            view.copy_(p.data)
            p.data = view
            masters.append(view)
        return _Streamed(index, params, offsets, host, masters)

    def remove(self) -> None:
        """Undo the hooks and leave every streamed block's weights on the host (their masters)."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for b, s in self.streamed.items():
            self._bind_host(b)

    # ---------------------------------------------------------------- moving weights
    def _record(self, event: str, block: int, slot: int | None = None) -> None:
        if self.trace is not None:
            self.trace.append((event, block, slot))

    def _slot(self, block: int) -> int:
        return self.rank[block] % self.ring_size

    def _bind_host(self, block: int) -> None:
        s = self.streamed[block]
        for p, master in zip(s.params, s.masters):
            p.data = torch.full_like(master, float("nan")) if self.poison_evicted else master

    def _load(self, block: int) -> None:
        """Copy `block` into its slot (evicting the slot's block back to its host master: no transfer)."""
        slot = self._slot(block)
        if self.in_slot[slot] == block:
            return
        if self.in_slot[slot] is not None:
            self._bind_host(self.in_slot[slot])
        s = self.streamed[block]
        dest = self.slots[slot][: s.host.numel()]
        if self.cuda:
            # the slot may still be read by work already queued on the compute stream: the copy waits for it
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                dest.copy_(s.host, non_blocking=True)
                self.ready[slot] = torch.cuda.Event()
                self.ready[slot].record(self.stream)
        else:
            dest.copy_(s.host)
        for p, off in zip(s.params, s.offsets):
            p.data = _view(self.slots[slot], off, p)
        self.in_slot[slot] = block
        self._record("load", block, slot)

    def _ensure(self, block: int) -> int:
        """`block` loaded and its copy finished as far as the compute stream is concerned; returns its slot."""
        self._load(block)
        slot = self._slot(block)
        if self.cuda and self.ready[slot] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready[slot])
            self.ready[slot] = None
        return slot

    def _release_backward(self, block: int) -> None:
        """`block`'s backward is over: its slot takes the streamed block `ring_size` ranks below."""
        below = self.rank[block] - self.ring_size
        if below >= 0:
            self._load(self.order[below])

    # ---------------------------------------------------------------- hooks
    def _pre_forward(self, k: int):
        def hook(module, args):
            if k in self.rank:
                slot = self._ensure(k)
                self._record("forward", k, slot)
            if _in_backward():  # a checkpoint's recomputation: nothing to schedule
                return
            if k == 0:
                self.pending.clear()
            if torch.is_grad_enabled() and not _saved_tensor_hooks_active():
                ctx = torch.autograd.graph.saved_tensors_hooks(self._pack_saved, self._unpack_saved)
                ctx.__enter__()
                self._hooks.append((k, ctx))
        return hook

    def _post_forward(self, k: int):
        def hook(module, args, output):
            if self._hooks and self._hooks[-1][0] == k:
                self._hooks.pop()[1].__exit__(None, None, None)
            if _in_backward():
                return None
            if k in self.rank:
                r = self.rank[k]
                if r + self.ring_size < len(self.order):
                    self._load(self.order[r + self.ring_size])
                elif not torch.is_grad_enabled() and r == len(self.order) - 1:
                    for first in self.order[: self.ring_size]:  # no backward follows: preload the next call's first
                        self._load(first)
            if torch.is_grad_enabled():
                _on_backward(output, self, k)
            return None
        return hook

    def before_backward(self, k: int) -> None:
        """Block k's output gradient has arrived (its backward is about to run)."""
        for b in [b for b in self.pending if b > k]:  # their backward is over (later nodes run first)
            self._release_backward(b)
            self.pending.remove(b)
        if k in self.rank:
            slot = self._ensure(k)
            self._record("backward", k, slot)
            if k not in self.pending:
                self.pending.append(k)

    # ---------------------------------------------------------------- saved tensors (no checkpointing)
    def _pack_saved(self, t: torch.Tensor):
        slot = self.slot_of_storage.get(t.untyped_storage().data_ptr()) if t.device == self.device else None
        if slot is None:
            # detached: keeping `t` itself would tie a saved output to its own grad_fn (a reference cycle that
            # only the garbage collector frees); the version keeps autograd's in-place check
            return _Kept(t.detach(), t._version)
        base = self.slots[slot].data_ptr()
        return _SlotRef(self.in_slot[slot], t.data_ptr() - base, t.shape, t.stride(), t.dtype)

    def _unpack_saved(self, packed):
        if isinstance(packed, _Kept):
            if packed.tensor._version != packed.version:
                raise RuntimeError("one of the variables needed for gradient computation has been modified by an "
                                   "inplace operation (inside a block under --blocks_to_swap)")
            return packed.tensor
        slot = self._ensure(packed.block)
        self._record("unpack", packed.block, slot)
        elem = torch.empty((), dtype=packed.dtype).element_size()
        return self.slots[slot].view(packed.dtype).as_strided(packed.shape, packed.stride, packed.offset // elem)


@dataclass(frozen=True)
class _Kept:
    tensor: torch.Tensor
    version: int


@dataclass(frozen=True)
class _SlotRef:
    """A saved weight of a streamed block, by position inside the block's layout (not by slot memory)."""

    block: int
    offset: int
    shape: torch.Size
    stride: tuple
    dtype: torch.dtype


def _on_backward(output, swap: BlockSwap, k: int) -> None:
    """Call swap.before_backward(k) when the first gradient reaches one of the block's outputs. A gradient hook
    adds no node to the graph: an output nothing uses (the last block's text stream) stays unreachable, so its
    LoRA gets no gradient at all, exactly as without block swap (an identity node, or a module full-backward
    hook, would hand it zeros)."""
    items = list(output) if isinstance(output, (tuple, list)) else [output]
    tensors = [t for t in items if isinstance(t, torch.Tensor) and t.requires_grad]
    if tensors:
        torch.autograd.graph.register_multi_grad_hook(tensors, lambda grads: swap.before_backward(k), mode="any")


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _saved_tensor_hooks_active() -> bool:
    """Another saved-tensor hook (a non-reentrant checkpoint, an activation offload) already decides what is
    kept; a checkpoint drops the weights anyway and recomputes them through our forward hook."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def install(model: nn.Module, blocks: nn.ModuleList, blocks_to_swap: int, device: torch.device | str,
            ring_size: int = 2) -> BlockSwap | None:
    """`model` (loaded on the host) onto `device` except the streamed blocks' frozen weights; None when S is 0."""
    device = torch.device(device)
    check_blocks_to_swap(len(blocks), blocks_to_swap, ring_size)
    if blocks_to_swap == 0:
        model.to(device)
        return None
    swap = BlockSwap(blocks, blocks_to_swap, device, ring_size)
    streamed = {id(p) for s in swap.streamed.values() for p in s.params}
    with torch.no_grad():
        for p in model.parameters():
            if id(p) not in streamed:
                p.data = p.data.to(device)
        for module in model.modules():
            for name, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[name] = buf.to(device)
    return swap


def enable(denoiser, blocks_to_swap: int, device: torch.device | str, ring_size: int = 2) -> BlockSwap | None:
    """A denoiser loaded on the host, put on `device` with `blocks_to_swap` of its family's blocks streamed."""
    swap = install(denoiser.module, denoiser.swap_blocks(), blocks_to_swap, device, ring_size)
    denoiser.block_swap = swap  # the hooks hold the schedule; keep it reachable from the denoiser
    if swap is not None:
        log.info("block swap: %d of %d blocks streamed through %d device buffers (blocks %s); %d blocks' weights "
                 "on the device at the peak", blocks_to_swap, len(swap.blocks), swap.ring_size, swap.order,
                 resident_blocks(len(swap.blocks), blocks_to_swap, ring_size))
    return swap
