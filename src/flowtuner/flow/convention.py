"""The one flow convention: x_t = (1 - sigma) x0 + sigma eps; sigma = 1 is pure noise; the model
predicts v = eps - x0; x0 = x_t - sigma v."""

import torch


def noisy(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return (1 - sigma) * x0 + sigma * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def x0_from_v(x_t: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return x_t - sigma * v


# The VP path (x_vp = a x0 + s eps, a^2 + s^2 = 1) and the VE path (x_ve = x0 + s_ve eps) through the same point as
# the flow state at sigma: the change of variables eps / v models (SDXL) and their objectives are written in.
def vp_coefficients(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, s) of the VP path through flow sigma: a = (1 - sigma) / r, s = sigma / r, r = sqrt((1 - sigma)^2 + sigma^2)."""
    r = ((1 - sigma) ** 2 + sigma**2).sqrt()
    return (1 - sigma) / r, sigma / r


def ve_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """The VE / DDPM-table sigma s / a of flow sigma (infinite at 1)."""
    return sigma / (1 - sigma)


def flow_sigma(sigma_ve: torch.Tensor) -> torch.Tensor:
    """Inverse of `ve_sigma`: sigma_VE / (1 + sigma_VE)."""
    return sigma_ve / (1 + sigma_ve)
