"""The SDXL denoiser: diffusers' UNet2DConditionModel behind flowtuner's one convention, predict(x, sigma) -> the
flow velocity v = eps - x0 at x = (1 - sigma) x0 + sigma eps, whatever the checkpoint was trained to predict.

Prediction types (`PARAMETRISATIONS`), each a map from the flow state to the UNet's input and back:
- `flow` (bigASP v2.5): the UNet sees the flow state itself and the float timestep 1000 sigma, and outputs v.
- `eps` / `v` (ordinary SDXL checkpoints, the 1000-step scaled-linear DDPM schedule, zsnr optional): the flow path
  and the VP path x_vp = a x0 + s eps (a^2 + s^2 = 1) are the same path up to a scale, x_flow = x_vp / (a + s) at
  sigma_flow = s / (a + s), i.e. sigma_VE = s / a = sigma / (1 - sigma). The UNet gets x_vp and the discrete
  timestep of sigma_VE found as ComfyUI finds it (the nearest table sigma in log space, flow/discrete.py), so
  the sigmas of a discrete schedule reach it as exactly their table index; its eps (or VP-v) output becomes x0 and
  eps estimates, and v = eps - x0.

Micro-conditioning: text_embeds = the pooled vector (cond.extra["pooled"]); time_ids = (original h, w, crop top,
left, target h, w) in pixels. Original size and crop come from cond.extra ("original_size", "crop_top_left", [B, 2]
each) when a cache recorded them, else the target size and (0, 0) (what diffusers and ComfyUI use by default).
Height comes first everywhere: the bigASP recipe's "goofed on height vs width" note ends in this same order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from flowtuner.families.base import Conditioning, Denoiser, LatentGeometry
from flowtuner.flow.convention import ve_sigma, vp_coefficients
from flowtuner.flow.discrete import DiscreteSampling, discrete

VAE_FACTOR = 8
LATENT_CHANNELS = 4
#: the flow UNet's timestep scale: ComfyUI's ModelSamplingSD3 multiplier, the recipe's 1000 sigma
FLOW_MULTIPLIER = 1000.0


@dataclass(frozen=True)
class Parametrisation:
    """How the UNet reads a flow state: `inputs(x, sigma)` -> (UNet input, timestep [B]), and `velocity(out, x_in,
    sigma)` -> the flow velocity from the UNet output (all per-sample sigma [B, 1, 1, 1] except the timestep)."""

    name: str
    inputs: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    velocity: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    discrete: bool  # samples on the DDPM table (its sigmas are VE sigmas)


def _flow_inputs(x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x, sigma.reshape(-1) * FLOW_MULTIPLIER  # the one x1000 of the flow UNet


def _discrete_inputs(table: DiscreteSampling):
    def inputs(x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, s = vp_coefficients(sigma)
        return x * (a + s), table.timestep(ve_sigma(sigma).reshape(-1))

    return inputs


def _eps_velocity(out: torch.Tensor, x_vp: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    a, s = vp_coefficients(sigma)
    return out - (x_vp - s * out) / a


def _v_velocity(out: torch.Tensor, x_vp: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    a, s = vp_coefficients(sigma)
    return (s * x_vp + a * out) - (a * x_vp - s * out)  # eps - x0 from the VP velocity a eps - s x0


def parametrisation(name: str, zsnr: bool = False) -> Parametrisation:
    """The prediction type `name` (flow, eps, v); eps / v on the DDPM table, rescaled to zero terminal SNR if `zsnr`."""
    if name == "flow":
        return Parametrisation("flow", _flow_inputs, lambda out, x, sigma: out, discrete=False)
    table = discrete(zsnr=zsnr)
    return Parametrisation(name, _discrete_inputs(table), PARAMETRISATIONS[name], discrete=True)


#: prediction type -> the UNet output -> flow velocity map (flow is the identity)
PARAMETRISATIONS: dict[str, Callable] = {"flow": lambda out, x, sigma: out, "eps": _eps_velocity, "v": _v_velocity}


def time_ids(geometry: LatentGeometry, cond: Conditioning, batch: int) -> torch.Tensor:
    """[B, 6] (original h, w, crop top, left, target h, w) in pixels."""
    target = torch.tensor([geometry.height, geometry.width], dtype=torch.float32).expand(batch, 2)
    original = cond.extra.get("original_size")
    crop = cond.extra.get("crop_top_left")
    original = target if original is None else original.to(torch.float32).reshape(-1, 2).expand(batch, 2)
    crop = torch.zeros(batch, 2) if crop is None else crop.to(torch.float32).reshape(-1, 2).expand(batch, 2)
    return torch.cat([original.cpu(), crop.cpu(), target], dim=1)


class SDXLDenoiser(Denoiser):
    feature_dim = 1  # [B, 4, h, w]: the channels of one latent cell

    def __init__(self, unet, prediction: Parametrisation):
        self.unet = self.module = unet
        self.prediction = prediction

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def geometry(self, height: int, width: int) -> LatentGeometry:
        h, w = height // VAE_FACTOR, width // VAE_FACTOR
        return LatentGeometry(height, width, (LATENT_CHANNELS, h, w), h * w)

    def noise(self, geometry: LatentGeometry, seed: int) -> torch.Tensor:
        """diffusers' StableDiffusionXLPipeline draw for Generator("cpu").manual_seed(seed): [1, 4, h, w] float32
        (the sampler scales it to its first sigma)."""
        gen = torch.Generator("cpu").manual_seed(seed)
        return torch.randn((1, *geometry.state_shape), generator=gen, dtype=torch.float32)

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, geometry: LatentGeometry) -> torch.Tensor:
        b = x.shape[0]
        device, dtype = x.device, self.dtype
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=device).reshape(-1).expand(b).reshape(b, 1, 1, 1)
        x = x.to(torch.float32)
        x_in, timestep = self.prediction.inputs(x, sigma)
        pooled = cond.extra["pooled"]
        unet_device = next(self.unet.parameters()).device
        out = self.unet(
            x_in.to(unet_device, dtype),
            timestep.to(unet_device, torch.float32),
            encoder_hidden_states=cond.embeds.to(unet_device, dtype).expand(b, -1, -1),
            added_cond_kwargs={"text_embeds": pooled.to(unet_device, dtype).expand(b, -1),
                               "time_ids": time_ids(geometry, cond, b).to(unet_device, dtype)},
            return_dict=False,
        )[0]
        return self.prediction.velocity(out.to(device, torch.float32), x_in, sigma)

    def perturbed_attention(self, blocks: str):
        """PAG: identity self-attention in `blocks` (families/sdxl/patches.py; 'middle' = ComfyUI's default)."""
        from flowtuner.families.sdxl.patches import identity_self_attention

        return identity_self_attention(self.unet, blocks)

    def record_self_attention(self):
        """SAG: a context yielding the list the mid block's first self-attention probabilities are put in, per call."""
        from flowtuner.families.sdxl.patches import recorded_self_attention

        return recorded_self_attention(self.unet)

    def model_patch(self, name: str, params: dict):
        """A context in which the UNet runs with the patch `name` (FreeU / FreeU_V2: patches.MODEL_PATCHES)."""
        from flowtuner.families.sdxl.patches import MODEL_PATCHES

        return MODEL_PATCHES[name](self.unet, params)

    def to_latents(self, x: torch.Tensor, geometry: LatentGeometry) -> torch.Tensor:
        return x[:, :, None]

    def grid(self, geometry: LatentGeometry) -> tuple:
        return (lambda x: x), (lambda d: d)

    def from_latents(self, latents: torch.Tensor) -> tuple[torch.Tensor, LatentGeometry]:
        """[B, 4, 1, h, w] (the cache layout) -> [B, 4, h, w]."""
        x = latents[:, :, 0] if latents.dim() == 5 else latents
        return x, self.geometry(x.shape[-2] * VAE_FACTOR, x.shape[-1] * VAE_FACTOR)
