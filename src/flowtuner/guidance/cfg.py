"""Classifier-free guidance as a composable wrapper around a prediction function.

Default for Qwen-Image is the reference's "true CFG with norm rescale": the guided velocity is
rescaled, per location, to the norm of the conditional one (norms over the feature axis, no clamp).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from flowtuner.families.base import Conditioning

CfgFunction = Callable[[torch.Tensor, torch.Tensor, float, int], torch.Tensor]


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
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A `model(x, sigma) -> v` for the samplers. The unconditional pass is skipped when scale <= 1."""
    if uncond is None or scale <= 1.0:
        return lambda x, sigma: predict(x, sigma, cond)
    combine = CFG_FUNCTIONS[cfg]

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        v_cond = predict(x, sigma, cond)
        v_uncond = predict(x, sigma, uncond)
        return combine(v_cond, v_uncond, scale, feature_dim)

    return model
