"""The training objective, written once for training and validation, keyed by the prediction type trained.

The model always answers in the flow convention (a denoiser's `predict` returns v = eps - x0 at
x_t = (1 - sigma) x0 + sigma eps), and every objective mixes its noisy sample on that path. What differs is what
the loss compares, after turning the model's v into the objective's own prediction:
- `flow`: v against eps - x0 (rectified flow; a discrete-schedule checkpoint trained so becomes a flow model);
- `eps`: the noise estimate x_t + (1 - sigma) v against eps (DDPM's objective);
- `v`: the VP velocity a eps_hat - s x0_hat against a eps - s x0, where a = (1 - sigma) / r, s = sigma / r,
  r = sqrt((1 - sigma)^2 + sigma^2) (the VP path x_vp = a x0 + s eps through the same point, Salimans & Ho).
`eps` and `v` train on the 1000-step DDPM table (flow/discrete.py, the scaled-linear betas, zero terminal SNR
optional): a draw u in (0, 1) from the timestep sampler picks table index int(1000 u), as kohya's
randint(min_timestep, max_timestep) picks it with `uniform` sampling, and its sigma moves to the flow path.
The model is conditioned on exactly the sigma the noise was mixed with. Training draws noise and sigma and
weights the per-sample losses; validation fixes both and does not weight."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from flowtuner.errors import ConfigError
from flowtuner.families.base import Conditioning, LatentGeometry
from flowtuner.flow.convention import noisy, velocity_target, vp_coefficients
from flowtuner.flow.discrete import discrete


def _eps_hat(x_t, v, sigma):
    return x_t + (1 - sigma) * v


def _vp_velocity_hat(x_t, v, sigma):
    a, s = vp_coefficients(sigma)
    return a * _eps_hat(x_t, v, sigma) - s * (x_t - sigma * v)


def _vp_velocity(x0, noise, sigma):
    a, s = vp_coefficients(sigma)
    return a * noise - s * x0


@dataclass(frozen=True)
class Objective:
    """`target(x0, noise, sigma)` and `prediction(x_t, v, sigma)` (the model's flow velocity in the target's
    terms); `discrete`: sigmas are DDPM table entries (draws map to table indices)."""

    name: str
    target: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    prediction: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    discrete: bool = False

    def sigmas(self, drawn: torch.Tensor, zsnr: bool = False) -> torch.Tensor:
        """The flow sigmas a batch trains at, from the timestep sampler's draws in (0, 1]."""
        if not self.discrete:
            return drawn
        table = discrete(zsnr=zsnr).table.double()
        index = (drawn.double() * len(table)).long().clamp(0, len(table) - 1)
        ve = table[index]
        return (ve / (1 + ve)).to(torch.float32)


OBJECTIVES: dict[str, Objective] = {
    "flow": Objective("flow", lambda x0, noise, sigma: velocity_target(x0, noise), lambda x_t, v, sigma: v),
    "eps": Objective("eps", lambda x0, noise, sigma: noise, _eps_hat, discrete=True),
    "v": Objective("v", _vp_velocity, _vp_velocity_hat, discrete=True),
}


def objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ConfigError(f"--prediction_type {name}: unknown; choose one of {', '.join(OBJECTIVES)}.")
    return OBJECTIVES[name]


def per_sample_loss(module: nn.Module, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, cond: Conditioning,
                    geometry: LatentGeometry, kind: Objective = OBJECTIVES["flow"]) -> torch.Tensor:
    """[B] mean squared error of `kind`. `module(x_t, sigma, cond, geometry)` predicts v; every tensor is on
    the module's device already; sigma is [B]."""
    s = sigma.view((-1,) + (1,) * (x0.dim() - 1))
    x_t = noisy(x0, noise, s)
    v = module(x_t, sigma, cond, geometry).float()
    return ((kind.prediction(x_t, v, s) - kind.target(x0, noise, s)) ** 2).flatten(1).mean(1)
