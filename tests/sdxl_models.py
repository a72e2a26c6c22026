"""Tiny SDXL components for tests: the real architectures and key layouts (SDXL's UNet block structure, the SD
VAE's four stages, CLIP-L and OpenCLIP-bigG as transformers' CLIP classes) at tiny widths, and writers for the
layouts users have (an A1111 / ComfyUI single file, a diffusers folder).

The CLIP vocabularies are the real 49408 tokens so /work/shared/fixtures/tokenizers/clip drives them."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# The cross-attention width is clip_l hidden + clip_g hidden, as in SDXL (768 + 1280 = 2048). What the weights do not
# say is SDXL's (families/sdxl/configs.py): 64-channel heads (UNet and CLIP), 32 GroupNorm groups, 256-dim
# micro-conditioning embeddings; so the tiny widths are multiples of 64 (32 for the first UNet / VAE stage).
CLIP_L_HIDDEN = 64
CLIP_G_HIDDEN = 128
CLIP_G_PROJECTION = 96
TIME_EMBED = 256  # addition_time_embed_dim: fixed by the architecture (ComfyUI hard-codes it)

TINY_CLIP_L = dict(
    vocab_size=49408, hidden_size=CLIP_L_HIDDEN, intermediate_size=128, num_hidden_layers=3, num_attention_heads=1,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=CLIP_L_HIDDEN,
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
TINY_CLIP_G = dict(
    vocab_size=49408, hidden_size=CLIP_G_HIDDEN, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
    max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=CLIP_G_PROJECTION,
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    only_cross_attention=False, block_out_channels=[32, 64, 128], layers_per_block=2, downsample_padding=1,
    mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
    cross_attention_dim=CLIP_L_HIDDEN + CLIP_G_HIDDEN, transformer_layers_per_block=[1, 2, 2],
    attention_head_dim=[1, 1, 2], use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=TIME_EMBED, projection_class_embeddings_input_dim=6 * TIME_EMBED + CLIP_G_PROJECTION,
    upcast_attention=False, resnet_time_scale_shift="default",
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[32, 32, 64, 64], layers_per_block=2, act_fn="silu", latent_channels=4, norm_num_groups=32,
    sample_size=64, scaling_factor=0.13025, force_upcast=True,
)


def tiny_clip_l(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(**TINY_CLIP_L)).eval()


def tiny_clip_g(seed: int = 1):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(CLIPTextConfig(**TINY_CLIP_G)).eval()


def tiny_unet(seed: int = 2):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_UNET).eval()


def tiny_vae(seed: int = 3):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**TINY_VAE).eval()


def tiny_sdxl(seed: int = 0):
    """(unet, vae, clip_l, clip_g), seeded."""
    return tiny_unet(seed + 2), tiny_vae(seed + 3), tiny_clip_l(seed), tiny_clip_g(seed + 1)


def write_diffusers_folder(root: Path, unet, vae, clip_l, clip_g) -> Path:
    """A diffusers StableDiffusionXLPipeline folder (no tokenizers/scheduler unless added by the caller)."""
    root = Path(root)
    for name, model in (("unet", unet), ("vae", vae), ("text_encoder", clip_l), ("text_encoder_2", clip_g)):
        model.save_pretrained(root / name, safe_serialization=True)
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    }))
    return root


def write_single_file(path: Path, unet, vae, clip_l, clip_g, dtype: torch.dtype | None = None,
                      extra: dict[str, torch.Tensor] | None = None) -> Path:
    """An A1111 / ComfyUI single-file checkpoint (ldm / sgm key names) of the given models."""
    from flowtuner.families.sdxl.checkpoint import save_checkpoint

    save_checkpoint(path, unet, vae, clip_l, clip_g, dtype=dtype, extra=extra)
    return Path(path)
