"""Tiny random models of the real Qwen-Image architectures (diffusers / transformers classes with
small configs), used by the tests, the benchmarks and the CPU demo. Head sizes stay at the real 128
so the shape-based config inference treats them exactly like released checkpoints."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

TEXT_HIDDEN = 128
VOCAB = 152064  # the real vocabulary: the real tokenizer's ids must fit


def tiny_dit(seed: int = 0, layers: int = 2) -> QwenImageTransformer2DModel:
    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=layers, attention_head_dim=128,
        num_attention_heads=1, joint_attention_dim=TEXT_HIDDEN, axes_dims_rope=(16, 56, 56),
    ).eval()


def tiny_vae(seed: int = 0) -> AutoencoderKLQwenImage:
    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(
        base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
        temperal_downsample=[False, True, True],
    ).eval()


def tiny_text_encoder_config() -> Qwen2_5_VLConfig:
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=VOCAB, hidden_size=TEXT_HIDDEN, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=1, num_key_value_heads=1, rms_norm_eps=1e-6, max_position_embeddings=128000,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        ),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TEXT_HIDDEN,
                           fullatt_block_indexes=[0]),
    )


def tiny_text_encoder(seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(tiny_text_encoder_config()).eval()
