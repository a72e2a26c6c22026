"""The flow-matching objective, written once for training and validation: x_t = (1 - sigma) x0 + sigma eps,
target eps - x0, MSE per sample. The model is conditioned on exactly the sigma the noise was mixed with.
Training draws noise and sigma and weights the per-sample losses; validation fixes both and does not weight."""

from __future__ import annotations

import torch
from torch import nn

from flowtuner.families.base import Conditioning, LatentGeometry
from flowtuner.flow.convention import noisy, velocity_target


def per_sample_loss(module: nn.Module, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, cond: Conditioning,
                    geometry: LatentGeometry) -> torch.Tensor:
    """[B] mean squared velocity error. `module(x_t, sigma, cond, geometry)` predicts v; every tensor is on
    the module's device already; sigma is [B]."""
    x_t = noisy(x0, noise, sigma.view((-1,) + (1,) * (x0.dim() - 1)))
    v = module(x_t, sigma, cond, geometry)
    return ((v.float() - velocity_target(x0, noise)) ** 2).flatten(1).mean(1)
