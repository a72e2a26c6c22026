"""Qwen-Image VAE (Wan-2.1 style): load either key layout into `diffusers.AutoencoderKLQwenImage`,
and encode / decode with the per-channel latent normalisation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from diffusers import AutoencoderKLQwenImage

from flowtuner.errors import WeightsError
from flowtuner.families.base import ImageCodec
from flowtuner.families.identify import describe
from flowtuner.families.qwen_image.dit import find_prefix
from flowtuner.families.qwen_image.vae_keys import is_wan_layout, wan_num_res_blocks, wan_to_diffusers
from flowtuner.weights.materialize import assign_weights, build_empty, is_auxiliary, read_dequantized, storage_dtype
from flowtuner.weights.reader import Checkpoint, open_checkpoint

VAE_PREFIXES = ("", "vae.")
# RMS-norm `gamma` keys tell the Wan-style VAE apart from SD's VAE, which has the same conv names.
DIFFUSERS_PROBE = "decoder.norm_out.gamma"
WAN_PROBE = "decoder.head.0.gamma"


def diffusers_view(ckpt: Checkpoint) -> dict[str, str]:
    """module key -> file key, whatever the file's layout."""
    prefix = find_prefix(ckpt, DIFFUSERS_PROBE, VAE_PREFIXES)
    if prefix is None:
        prefix = find_prefix(ckpt, WAN_PROBE, VAE_PREFIXES)
    if prefix is None:
        raise WeightsError(f"{ckpt.path}: expected a Qwen-Image VAE, but this looks like {describe(ckpt)}.")
    keys = [k[len(prefix):] for k in ckpt.keys() if k.startswith(prefix) and not is_auxiliary(k[len(prefix):])]
    if is_wan_layout(keys):
        r = wan_num_res_blocks(keys)
        return {wan_to_diffusers(k, r): prefix + k for k in keys}
    return {k: prefix + k for k in keys}


def infer_config(shapes: dict[str, tuple[int, ...]]) -> dict:
    """AutoencoderKLQwenImage arguments from (diffusers-named) tensor shapes."""
    base_dim, in_ch = shapes["encoder.conv_in.weight"][:2]
    resample = sorted(int(m.group(1)) for k in shapes if (m := re.match(r"^encoder\.down_blocks\.(\d+)\.resample\.1\.weight$", k)))
    r = resample[0]
    stage_starts = [0] + [i + 1 for i in resample]
    dim_mult = [shapes[f"encoder.down_blocks.{s}.conv2.weight"][0] // base_dim for s in stage_starts]
    temporal = [f"encoder.down_blocks.{i}.time_conv.weight" in shapes for i in resample]
    if any(".attentions." in k and ".mid_block." not in k for k in shapes):
        raise WeightsError("VAE with attention outside the middle block: put its diffusers config.json beside it.")
    return {"base_dim": base_dim, "z_dim": shapes["post_quant_conv.weight"][0], "dim_mult": dim_mult,
            "num_res_blocks": r, "attn_scales": [], "temperal_downsample": temporal, "input_channels": in_ch}


def load_vae(path: str | Path, device: torch.device | str = "cpu") -> AutoencoderKLQwenImage:
    ckpt = open_checkpoint(path)
    view = diffusers_view(ckpt)
    shapes = {k: ckpt.shape(v) for k, v in view.items()}
    config_file = (ckpt.path if ckpt.path.is_dir() else ckpt.path.parent) / "config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else None
    if not config or config.get("_class_name") != AutoencoderKLQwenImage.__name__:
        config = infer_config(shapes)
    dtype = storage_dtype(ckpt, view["decoder.conv_in.weight"])
    model = build_empty(lambda: AutoencoderKLQwenImage.from_config(config))
    assign_weights(model, ((k, read_dequantized(ckpt, v, dtype)) for k, v in view.items()), ckpt)
    return model.to(device).eval().requires_grad_(False)


class QwenImageCodec(ImageCodec):
    def __init__(self, vae: AutoencoderKLQwenImage):
        self.vae = vae
        cfg = vae.config
        self.mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1)
        self.std = torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1)

    def _param(self) -> torch.Tensor:
        return next(self.vae.parameters())

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        p = self._param()
        z = latents.to(p.device, p.dtype)
        z = z / (1.0 / self.std.to(z)) + self.mean.to(z)  # same arithmetic as the reference pipeline
        images = self.vae.decode(z, return_dict=False)[0][:, :, 0]
        return (images.float() / 2 + 0.5).clamp(0, 1).cpu()

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> normalised latents [B, 16, 1, h, w] (posterior mode)."""
        p = self._param()
        x = (images.to(p.device, p.dtype) * 2 - 1).unsqueeze(2)
        z = self.vae.encode(x).latent_dist.mode()
        return (z - self.mean.to(z)) / self.std.to(z)
