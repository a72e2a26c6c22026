"""SDXL's built-in model configurations (stabilityai/stable-diffusion-xl-base-1.0's config.json values, nothing
fetched) and their inference from tensor shapes, so tiny test models with SDXL's layout load like real files.

What the weights cannot say is fixed by the architecture: 64-channel attention heads, 32 GroupNorm groups, a
256-dim embedding per micro-conditioning number. Everything else (widths, depths, which blocks attend, the
cross-attention and pooled widths) is read from shapes."""

from __future__ import annotations

import re

from flowtuner.errors import WeightsError

HEAD_CHANNELS = 64  # ldm num_head_channels: SDXL's attention_head_dim [5, 10, 20] is 320/64, 640/64, 1280/64
NORM_GROUPS = 32
TIME_IDS_EMBED = 256  # addition_time_embed_dim: original size, crop, target size, each (h, w), each 256-dim
SCALING_FACTOR = 0.13025

UNET = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": TIME_IDS_EMBED, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": NORM_GROUPS, "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128, "time_cond_proj_dim": None,
    "time_embedding_act_fn": None, "time_embedding_dim": None, "time_embedding_type": "positional",
    "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}
VAE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": NORM_GROUPS,
    "out_channels": 3, "sample_size": 1024, "scaling_factor": SCALING_FACTOR, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
_CLIP = {"attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "initializer_factor": 1.0,
         "initializer_range": 0.02, "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "pad_token_id": 1,
         "vocab_size": 49408}
CLIP_L = {**_CLIP, "hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
          "num_hidden_layers": 12, "projection_dim": 768}
CLIP_G = {**_CLIP, "hidden_act": "gelu", "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
          "num_hidden_layers": 32, "projection_dim": 1280}
# the heads of a CLIP width, where the weights cannot tell (the released widths); others: 64-channel heads
CLIP_HEADS = {768: 12, 1280: 20}


def _count(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := rx.match(k))})


def _heads(channels: int) -> int:
    return max(1, channels // HEAD_CHANNELS)


def infer_unet(shapes: dict[str, tuple[int, ...]]) -> dict:
    """UNet2DConditionModel config from diffusers-named shapes."""
    keys = list(shapes)
    n_blocks = _count(keys, r"^down_blocks\.(\d+)\.")
    widths = [shapes[f"down_blocks.{b}.resnets.0.conv1.weight"][0] for b in range(n_blocks)]
    attends = [f"down_blocks.{b}.attentions.0.proj_in.weight" in shapes for b in range(n_blocks)]
    depth = [_count(keys, rf"^down_blocks\.{b}\.attentions\.0\.transformer_blocks\.(\d+)\.") or 1 for b in range(n_blocks)]
    mid_depth = _count(keys, r"^mid_block\.attentions\.0\.transformer_blocks\.(\d+)\.")
    if mid_depth != depth[-1]:
        raise WeightsError(f"UNet middle block has {mid_depth} transformer layers, the last down block {depth[-1]}: "
                           "not SDXL's layout; put its diffusers config.json beside it.")
    probe = next(f"down_blocks.{b}.attentions.0.transformer_blocks.0.attn2.to_k.weight" for b in range(n_blocks) if attends[b])
    adm = shapes["add_embedding.linear_1.weight"]
    return {
        **UNET,
        "in_channels": shapes["conv_in.weight"][1],
        "out_channels": shapes["conv_out.weight"][0],
        "block_out_channels": widths,
        "layers_per_block": _count(keys, r"^down_blocks\.0\.resnets\.(\d+)\."),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)],
        "transformer_layers_per_block": depth,
        "attention_head_dim": [_heads(w) for w in widths],
        "cross_attention_dim": shapes[probe][1],
        "projection_class_embeddings_input_dim": adm[1],
    }


def infer_vae(shapes: dict[str, tuple[int, ...]]) -> dict:
    """AutoencoderKL config from diffusers-named shapes."""
    keys = list(shapes)
    n_blocks = _count(keys, r"^encoder\.down_blocks\.(\d+)\.")
    return {
        **VAE,
        "in_channels": shapes["encoder.conv_in.weight"][1],
        "out_channels": shapes["decoder.conv_out.weight"][0],
        "block_out_channels": [shapes[f"encoder.down_blocks.{b}.resnets.0.conv2.weight"][0] for b in range(n_blocks)],
        "down_block_types": ["DownEncoderBlock2D"] * n_blocks,
        "up_block_types": ["UpDecoderBlock2D"] * n_blocks,
        "layers_per_block": _count(keys, r"^encoder\.down_blocks\.0\.resnets\.(\d+)\."),
        "latent_channels": shapes["post_quant_conv.weight"][0],
    }


def infer_clip(shapes: dict[str, tuple[int, ...]], base: dict) -> dict:
    """CLIPTextConfig arguments from transformers-named shapes; `base` (CLIP_L or CLIP_G) gives the activation."""
    vocab, hidden = shapes["text_model.embeddings.token_embedding.weight"]
    projection = shapes.get("text_projection.weight", (hidden,))[0]
    return {
        **base,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0],
        "num_hidden_layers": _count(list(shapes), r"^text_model\.encoder\.layers\.(\d+)\."),
        "num_attention_heads": CLIP_HEADS.get(hidden, _heads(hidden)),
        "max_position_embeddings": shapes["text_model.embeddings.position_embedding.weight"][0],
        "projection_dim": projection,
    }
