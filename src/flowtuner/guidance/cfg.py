"""Classifier-free guidance as a composable wrapper around a prediction function.

Default for Qwen-Image is the reference's "true CFG with norm rescale": the guided velocity is
rescaled, per location, to the norm of the conditional one (norms over the feature axis, no clamp).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from flowtuner.families.base import Conditioning

CfgFunction = Callable[[torch.Tensor, torch.Tensor, float, int], torch.Tensor]


def runs_uncond(scale: float, methods: list[tuple[str, dict]] | None = None) -> bool:
    """Whether a guidance scale needs the unconditional pass (and so a negative prompt): only above 1, where
    CFG differs from the conditional prediction, or when a --guidance method reads that pass (SAG; ComfyUI's
    disable_cfg1_optimization). Decided here only; sampling, prompt encoding and the negative-prompt default
    all ask this."""
    from flowtuner.guidance.methods import METHODS

    return scale > 1 or any(METHODS[name].needs_uncond for name, _ in methods or ())


def plain_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float, feature_dim: int) -> torch.Tensor:
    return uncond + scale * (cond - uncond)


def norm_rescaled_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float, feature_dim: int) -> torch.Tensor:
    comb = plain_cfg(cond, uncond, scale, feature_dim)
    cond_norm = torch.linalg.vector_norm(cond, dim=feature_dim, keepdim=True)
    comb_norm = torch.linalg.vector_norm(comb, dim=feature_dim, keepdim=True)
    return comb * (cond_norm / comb_norm)


CFG_FUNCTIONS: dict[str, CfgFunction] = {"norm_rescale": norm_rescaled_cfg, "plain": plain_cfg}


def guided_model(
    predict: Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor],
    cond: Conditioning,
    uncond: Conditioning | None,
    scale: float,
    feature_dim: int = -1,
    cfg: str = "norm_rescale",
    methods: list[tuple[str, dict]] | None = None,
    grid: tuple[Callable, Callable] | None = None,
    perturb: Callable[[str], AbstractContextManager] | None = None,
    layout: str = "grid",
    record: Callable[[], AbstractContextManager] | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A `model(x, sigma) -> v` for the samplers. The unconditional pass is skipped when scale <= 1.
    `methods` (name, params) are guidance hooks run on the image grid (`grid` = (to_grid, from_grid)),
    laid out as `layout` says (`methods.LAYOUTS`); `perturb(blocks)` is a context in which the model runs
    with perturbed attention (for PAG); `record()` a context that yields a list into which the model, run in
    it, puts its self-attention probabilities at the family's recording site (for SAG)."""
    if methods:
        from flowtuner.guidance.methods import LAYOUTS

        passes = Passes(predict, cond, uncond, scale, perturb, record, methods)
        return _hooked_model(passes, feature_dim, cfg, methods, LAYOUTS[layout](grid))
    if uncond is None or not runs_uncond(scale):
        return lambda x, sigma: predict(x, sigma, cond)
    combine = CFG_FUNCTIONS[cfg]

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        v_cond = predict(x, sigma, cond)
        v_uncond = predict(x, sigma, uncond)
        return combine(v_cond, v_uncond, scale, feature_dim)

    return model


class Passes:
    """The model runs one guided step may make: the conditional pass, the unconditional one (recording its
    self-attention when a method reads it) and the extra passes post-CFG methods ask for, all at the step's
    sigma. Every D is on the grid: D = x - sigma v."""

    def __init__(self, predict, cond, uncond, scale, perturb, record, methods):
        from flowtuner.errors import ConfigError
        from flowtuner.guidance.methods import METHODS

        self.predict, self.cond, self.uncond, self.scale, self.perturb = predict, cond, uncond, scale, perturb
        self.run_uncond = uncond is not None and runs_uncond(scale, methods)
        reader = next((name for name, _ in methods if METHODS[name].reads_attention), None)
        if reader and record is None:
            raise ConfigError(f"--guidance {reader}: reads a UNet's middle-block self-attention, which this model has "
                              "none of; drop it (pag gives structure guidance on any family).")
        self.record = record if reader else None
        needy = next((name for name, _ in methods if METHODS[name].needs_uncond), None)
        if needy and uncond is None:
            raise ConfigError(f"--guidance {needy}: needs the unconditional pass; give a --negative_prompt.")

    def velocity(self, x, sigma, cond) -> torch.Tensor:
        return self.predict(x, sigma, cond).to(torch.float32)

    def unconditional(self, x, sigma) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(v_u, its recorded attention) or (None, None) when the pass is skipped."""
        if not self.run_uncond:
            return None, None
        if self.record is None:
            return self.velocity(x, sigma, self.uncond), None
        with self.record() as recorded:
            v = self.velocity(x, sigma, self.uncond)
        return v, recorded[-1]

    def denoised(self, sigma, cond, to_grid, from_grid) -> Callable[[torch.Tensor], torch.Tensor]:
        """x (grid) -> D (grid) of one more pass with `cond` at this sigma."""
        def run(x_grid: torch.Tensor) -> torch.Tensor:
            x_state = from_grid(x_grid)
            return to_grid(x_state - float(sigma) * self.velocity(x_state, sigma, cond))

        return run

    def perturbed(self, x, sigma, blocks: str, to_grid) -> torch.Tensor:
        """D of the conditional pass with perturbed attention in `blocks` (one extra forward)."""
        if self.perturb is None:
            from flowtuner.errors import ConfigError

            raise ConfigError("--guidance pag: this model family has no perturbed-attention pass.")
        with self.perturb(blocks):
            v = self.velocity(x, sigma, self.cond)
        return to_grid(x - float(sigma) * v)


def _hooked_model(passes: Passes, feature_dim, cfg, methods, grid):
    """pre-CFG hooks -> one CFG function -> post-CFG hooks, on denoised predictions D = x - sigma v in the
    image-grid layout. Without a CFG-stage method the family's own CFG (here: true CFG with norm rescale,
    on velocities) combines the hooked predictions."""
    from flowtuner.errors import ConfigError
    from flowtuner.guidance.methods import METHODS, Step

    chain = [(METHODS[name], params, {}) for name, params in methods]
    if sum(m.stage == "cfg" for m, _, _ in chain) > 1:
        raise ConfigError("--guidance: at most one CFG-function method (rescale_cfg, renorm_cfg) at a time.")
    to_grid, from_grid = grid
    combine = CFG_FUNCTIONS[cfg]
    scale = passes.scale

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = float(sigma)
        v_c = passes.velocity(x, sigma, passes.cond)
        v_u, attention = passes.unconditional(x, sigma)
        step = Step(to_grid(x), s, scale, to_grid(x - s * v_c), None if v_u is None else to_grid(x - s * v_u),
                    perturbed=lambda blocks: passes.perturbed(x, sigma, blocks, to_grid), uncond_attention=attention,
                    uncond_model=passes.denoised(sigma, passes.uncond, to_grid, from_grid))
        for method, params, state in chain:
            if method.stage == "pre":
                step.cond, step.uncond = method.fn(step, params, state)
        cfg_methods = [(m, p, st) for m, p, st in chain if m.stage == "cfg"]
        if cfg_methods:
            m, p, st = cfg_methods[0]
            d = m.fn(step, p, st)
        elif step.uncond is None:
            d = step.cond
        else:
            v = combine((x - from_grid(step.cond)) / s, (x - from_grid(step.uncond)) / s, scale, feature_dim)
            d = to_grid(x - s * v)
        for method, params, state in chain:
            if method.stage == "post":
                d = method.fn(step, d, params, state)
        return (x - from_grid(d)) / s

    return model
