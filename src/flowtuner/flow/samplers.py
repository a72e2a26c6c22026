"""Samplers: small pure functions over a model callable `model(x, sigma) -> v` and a sigma vector.

The state is kept in float32 whatever the model's dtype, so rounding does not accumulate over steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, torch.Tensor, torch.Tensor], None]


def euler(model: Model, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None = None) -> torch.Tensor:
    """First-order flow-matching Euler: x <- x + (sigma_next - sigma) v."""
    x = x.to(torch.float32)
    for i in range(len(sigmas) - 1):
        v = model(x, sigmas[i]).to(torch.float32)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
        if callback is not None:
            callback(i, x, sigmas[i])
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"euler": euler}
