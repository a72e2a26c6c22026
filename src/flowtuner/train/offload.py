"""`--gradient_checkpointing_cpu_offload`: gradient checkpointing whose saved block-boundary activations live in
host memory.

With per-block checkpointing (non-reentrant), what stays alive between forward and backward is each block's
*inputs*: the checkpoint keeps the arguments it was called with and recomputes the block from them in backward.
`torch.autograd.graph.save_on_cpu` does not reach them (they are held by the checkpoint's recomputation, not
packed through saved-tensor hooks), so the offload is a wrapper around each block instead, as musubi-tuner's
`create_cpu_offloading_wrapper` (PR #537): inside the checkpointed function the inputs move to the device, the
block runs, and its outputs return to the host. The next block is then called with host tensors, which is what
its checkpoint keeps. Recomputation in backward runs the same wrapper, so the inputs come back to the device
exactly (a copy), and loss and gradients are bit-identical to plain checkpointing.

Unlike musubi-tuner (its own model moves the last output back after the loop), the DiT here is diffusers',
whose forward uses the last block's output directly: the last block keeps its outputs on the device.
Transfers are synchronous: a non-blocking copy to pageable host memory is not safe to read, and the copies are
small beside the block's compute (one block boundary is batch x tokens x width values).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from flowtuner.errors import ConfigError


def _map(fn, value):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_map(fn, v) for v in value)
    return value


class ActivationOffload:
    """A gradient-checkpointing function (diffusers' `enable_gradient_checkpointing(fn)` interface:
    `fn(block, *args)`) that keeps the checkpointed inputs on `host`."""

    def __init__(self, blocks: Sequence[nn.Module], device: torch.device | str, host: torch.device | str = "cpu"):
        if not len(blocks):
            raise ValueError("activation offload needs the model's blocks")
        self.last = blocks[-1]
        self.device, self.host = torch.device(device), torch.device(host)
        self.calls = 0  # block runs, recomputations included (the tests count them)

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.host)

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device)

    def _run(self, block: nn.Module, *args):
        self.calls += 1
        out = block(*_map(self.to_device, args))
        return out if block is self.last else _map(self.to_host, out)

    def __call__(self, block: nn.Module, *args):
        return checkpoint(partial(self._run, block), *args, use_reentrant=False)


def enable_checkpointing(model: nn.Module, blocks: Sequence[nn.Module], device, cpu_offload: bool,
                         offload_cls: type[ActivationOffload] = ActivationOffload) -> ActivationOffload | None:
    """Per-block gradient checkpointing of a diffusers model; with `cpu_offload` the saved inputs live on the host."""
    if not cpu_offload:
        model.enable_gradient_checkpointing()
        return None
    offload = offload_cls(blocks, device)
    model.enable_gradient_checkpointing(offload)
    return offload


def check_offload_flags(gradient_checkpointing: bool, cpu_offload: bool) -> None:
    if cpu_offload and not gradient_checkpointing:
        raise ConfigError("--gradient_checkpointing_cpu_offload moves the inputs gradient checkpointing keeps to the "
                          "CPU; add --gradient_checkpointing.")
