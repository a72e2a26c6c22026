"""What `flowtuner plan` needs of Qwen-Image: the DiT's config and dtype (published, or from the file headers)
and the sizes of the models generation runs before and after it."""

from __future__ import annotations

import torch

from flowtuner.families.base import ModelPaths
from flowtuner.families.qwen_image.dit import FP8_DEFAULT, FP8_POLICIES
from flowtuner.plan import PlanSpec

# Qwen/Qwen-Image transformer/config.json (also musubi-tuner's hard-coded config): the published 20.4 B DiT
PUBLISHED_DIT = {"patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
                 "num_attention_heads": 24, "joint_attention_dim": 3584, "guidance_embeds": False,
                 "axes_dims_rope": (16, 56, 56)}
# Qwen2.5-VL-7B-Instruct's language model (what text-to-image loads of the text encoder)
PUBLISHED_TEXT = {"hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                  "intermediate_size": 18944, "vocab_size": 152064}
PUBLISHED_VAE = {"base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
                 "temperal_downsample": [False, True, True]}


def _meta_bytes(factory, dtype: torch.dtype) -> int:
    with torch.device("meta"):
        model = factory()
    return sum(p.numel() for p in model.parameters()) * dtype.itemsize


def _published_text_bytes() -> int:
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    return _meta_bytes(lambda: Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(**PUBLISHED_TEXT)), torch.bfloat16)


def _published_vae_bytes() -> int:
    from diffusers import AutoencoderKLQwenImage

    return _meta_bytes(lambda: AutoencoderKLQwenImage(**PUBLISHED_VAE), torch.bfloat16)


def _file_bytes(path, view) -> int:
    from flowtuner.weights.reader import open_checkpoint

    return view(open_checkpoint(path)).nbytes


def plan_spec(family, paths: ModelPaths | None, denoiser_cls, model: str) -> PlanSpec:
    """From the files' headers when `paths` has a DiT (text encoder / VAE too when given), else published sizes."""
    from diffusers import QwenImageTransformer2DModel

    from flowtuner.families.qwen_image.dit import inspect_dit
    from flowtuner.families.qwen_image.text_encoder import language_model_view
    from flowtuner.weights.reader import open_checkpoint

    if paths is not None and paths.dit is not None:
        info = inspect_dit(open_checkpoint(paths.dit))
        config, dtype, source = info.config, info.dtype, f"shapes from {paths.dit}"
    else:
        config, dtype, source = PUBLISHED_DIT, torch.bfloat16, "published sizes"

    def other_models() -> dict[str, int]:
        text = _file_bytes(paths.text_encoder, language_model_view) if paths and paths.text_encoder else _published_text_bytes()
        vae = _file_bytes(paths.vae, lambda c: c) if paths and paths.vae else _published_vae_bytes()
        return {"text_encoder": text, "vae": vae}

    def build(blocks: int):
        return QwenImageTransformer2DModel.from_config({**config, "num_layers": blocks})

    return PlanSpec(model=model, source=source, num_blocks=config["num_layers"], dtype=dtype, build=build,
                    denoiser=denoiser_cls, lora_targets=family.lora_default_targets,
                    text_width=config["joint_attention_dim"], other_models=other_models,
                    fp8_targets=FP8_POLICIES[FP8_DEFAULT].targets, blocks_path=family.lora_blocks,
                    split_attention=family.split_attention)
