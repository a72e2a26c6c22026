"""The one flow convention: x_t = (1 - sigma) x0 + sigma eps; sigma = 1 is pure noise; the model
predicts v = eps - x0; x0 = x_t - sigma v."""

import torch


def noisy(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return (1 - sigma) * x0 + sigma * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def x0_from_v(x_t: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return x_t - sigma * v
