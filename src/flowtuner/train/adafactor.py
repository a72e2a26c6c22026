"""Adafactor with stochastic rounding and per-parameter steps, for full fine-tuning in bf16.

transformers' Adafactor (the same algorithm, which the tests compare against) computes the update in
float32 but writes bf16 weights back with round-to-nearest: updates smaller than half a bf16 step
(about 0.4 % of the weight) vanish, so long low-lr runs under-train (musubi-tuner #784). Here the
float32 result is rounded stochastically (unbiased), and `step_param` lets the update run inside
backward, one parameter at a time, so full gradients never coexist in memory.
"""

from __future__ import annotations

import math

import torch


def copy_stochastic_(target: torch.Tensor, source: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """target (bf16) <- source (fp32) rounded up or down with probability given by the distance."""
    noise = torch.randint(0, 1 << 16, source.shape, dtype=torch.int32, device=source.device, generator=generator)
    bits = source.contiguous().view(torch.int32) + noise
    target.copy_((bits & -65536).view(torch.float32))


def _rms(t: torch.Tensor) -> torch.Tensor:
    return t.norm(2) / (t.numel() ** 0.5)


class Adafactor(torch.optim.Optimizer):
    def __init__(self, params, lr=None, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8, beta1=None,
                 weight_decay=0.0, scale_parameter=False, relative_step=False, warmup_init=False,
                 stochastic_rounding=True):
        if lr is not None and relative_step:
            raise ValueError("Adafactor: give either lr or relative_step=True, not both")
        if lr is None and not relative_step:
            raise ValueError("Adafactor: lr is required when relative_step=False")
        defaults = dict(lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate, beta1=beta1,
                        weight_decay=weight_decay, scale_parameter=scale_parameter, relative_step=relative_step,
                        warmup_init=warmup_init, stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults)
        self.generator: torch.Generator | None = None

    @staticmethod
    def _lr(group: dict, state: dict) -> float:
        rel = group["lr"]
        if group["relative_step"]:
            floor = 1e-6 * state["step"] if group["warmup_init"] else 1e-2
            rel = min(floor, 1.0 / math.sqrt(state["step"]))
        scale = max(group["eps"][1], float(state["RMS"])) if group["scale_parameter"] else 1.0
        return scale * rel

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    @torch.no_grad()
    def step_param(self, p: torch.Tensor) -> None:
        """Update one parameter now (called from its post-accumulate-grad hook)."""
        if getattr(self, "_group_of", None) is None:
            self._group_of = {id(q): g for g in self.param_groups for q in g["params"]}
        self._update(p, self._group_of[id(p)])

    def _update(self, p: torch.Tensor, group: dict) -> None:
        grad = p.grad.float()
        state = self.state[p]
        factored = grad.dim() >= 2
        if not state:
            state["step"] = 0
            if group["beta1"] is not None:
                state["exp_avg"] = torch.zeros_like(grad)
            if factored:
                state["exp_avg_sq_row"] = torch.zeros(grad.shape[:-1], device=grad.device)
                state["exp_avg_sq_col"] = torch.zeros(grad.shape[:-2] + grad.shape[-1:], device=grad.device)
            else:
                state["exp_avg_sq"] = torch.zeros_like(grad)
        p32 = p.float()
        state["step"] += 1
        state["RMS"] = _rms(p32)
        lr = self._lr(group, state)
        beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])
        update = grad**2 + group["eps"][0]
        if factored:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(update.mean(dim=-2), alpha=1.0 - beta2t)
            r = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            update = r * col.unsqueeze(-2).rsqrt() * grad
        else:
            v = state["exp_avg_sq"]
            v.mul_(beta2t).add_(update, alpha=1.0 - beta2t)
            update = v.rsqrt() * grad
        update.div_((_rms(update) / group["clip_threshold"]).clamp_(min=1.0))
        update.mul_(lr)
        if group["beta1"] is not None:
            state["exp_avg"].mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
            update = state["exp_avg"]
        if group["weight_decay"] != 0:
            p32.add_(p32, alpha=-group["weight_decay"] * lr)
        p32.add_(-update)
        if p.dtype == torch.bfloat16 and group["stochastic_rounding"]:
            copy_stochastic_(p, p32, self.generator)
        elif p.dtype != torch.float32:
            p.copy_(p32)


class FusedBackward:
    """Runs the optimizer step for each parameter as soon as its gradient is complete, then frees the
    gradient: peak gradient memory is one tensor, not the whole model."""

    def __init__(self, optimizer: Adafactor, params: list[torch.nn.Parameter]):
        self.handles = [p.register_post_accumulate_grad_hook(self._hook(optimizer)) for p in params]

    @staticmethod
    def _hook(optimizer):
        def hook(p):
            optimizer.step_param(p)
            p.grad = None
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
