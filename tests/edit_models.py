"""Tiny Qwen-Image-Edit model sets for tests: the Qwen2.5-VL text encoder with its vision tower, the Qwen2VL
processor diffusers' Edit pipelines take, and the whole set written as a diffusers repo (model_index.json naming
the Edit pipeline) and as ComfyUI single files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from flowtuner.families.qwen_image.vae_keys import diffusers_to_wan
from tests.layouts import legacy_te_key, state

# --model_version -> the diffusers pipeline class its model_index.json names (2511 ships as EditPlus too)
PIPELINE_CLASS = {"edit": "QwenImageEditPipeline", "edit-2509": "QwenImageEditPlusPipeline",
                  "edit-2511": "QwenImageEditPlusPipeline"}


def tiny_vl_config():
    """Tiny sizes, real structure: 128-dim text heads and 80-dim vision heads (so the shape-based config
    inference treats it like a released file), 2 vision blocks, the last with full attention."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=152064, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=1,
            num_key_value_heads=1, rms_norm_eps=1e-6, max_position_embeddings=128000,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        ),
        vision_config=dict(depth=2, hidden_size=80, intermediate_size=96, num_heads=1, out_hidden_size=128,
                           fullatt_block_indexes=[1], tokens_per_second=2),
    )


def with_image_positions():
    """Qwen2_5_VLForConditionalGeneration whose forward also passes mm_token_type_ids: the M-RoPE positions
    transformers 4.5x computed by itself (and musubi-tuner, ComfyUI use). diffusers 0.42.1 drops them on
    transformers 5.x (tests/test_edit_text.py documents it), so diffusers gets this class as its encoder."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    class WithImagePositions(Qwen2_5_VLForConditionalGeneration):
        def forward(self, input_ids=None, mm_token_type_ids=None, **kwargs):
            if mm_token_type_ids is None and input_ids is not None:
                mm_token_type_ids = (input_ids == self.config.image_token_id).int()
            self.model.rope_deltas = None
            return super().forward(input_ids=input_ids, mm_token_type_ids=mm_token_type_ids, **kwargs)

    return WithImagePositions


def tiny_vl(seed: int = 0):
    """The tiny VL model; the vision merger's output scaled x8 so the vision tokens weigh as much as the text."""
    torch.manual_seed(seed)
    model = with_image_positions()(tiny_vl_config()).eval()
    with torch.no_grad():
        model.model.visual.merger.mlp[2].weight.mul_(8)
    return model


def edit_processor(tokenizer):
    """diffusers' Edit pipelines need a Qwen2VLProcessor; built offline from the fixture tokenizer. Its class
    check rejects video_processor=None without torchvision, so that one check is skipped."""
    from transformers import Qwen2VLProcessor

    from flowtuner.families.qwen_image.edit_text import image_processor

    class NoVideo(Qwen2VLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            if name == "video_processor" and arg is None:
                return None
            return super().check_argument_for_proper_class(name, arg)

    return NoVideo(image_processor=image_processor(), tokenizer=tokenizer, video_processor=None)


def write_edit_repo(version: str, dit, vae, vl, tokenizer_dir: Path, root: Path, scheduler_config: dict) -> Path:
    """A diffusers Qwen-Image-Edit repo root: model_index.json naming the pipeline, transformer/ (its config
    carries zero_cond_t), vae/, text_encoder/ (with the vision weights), tokenizer/, processor/, scheduler/."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from flowtuner.families.qwen_image.edit_text import image_processor

    dit.save_pretrained(root / "transformer", max_shard_size="300KB")
    vae.save_pretrained(root / "vae")
    vl.save_pretrained(root / "text_encoder")
    shutil.copytree(tokenizer_dir, root / "tokenizer")
    shutil.copytree(tokenizer_dir, root / "processor")  # as released: the processor folder repeats the tokenizer
    image_processor().save_pretrained(root / "processor")
    FlowMatchEulerDiscreteScheduler(**scheduler_config).save_pretrained(root / "scheduler")
    index = {
        "_class_name": PIPELINE_CLASS[version], "_diffusers_version": "0.42.1",
        "processor": ["transformers", "Qwen2VLProcessor"], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"], "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "QwenImageTransformer2DModel"], "vae": ["diffusers", "AutoencoderKLQwenImage"],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root


def write_edit_comfyui_files(version: str, dit, vae, vl, comfy: Path) -> Path:
    """ComfyUI single files: the DiT (2511 with ComfyUI's __index_timestep_zero__ marker), the whole VL model in
    the legacy key layout (visual.* included, no lm_head, no config) and the VAE in Wan keys."""
    from flowtuner.families.qwen_image.dit import INDEX_TIMESTEP_ZERO

    dm, te, vae_dir = (comfy / "models" / d for d in ("diffusion_models", "text_encoders", "vae"))
    for d in (dm, te, vae_dir):
        d.mkdir(parents=True, exist_ok=True)
    dit_sd = state(dit)
    if version == "edit-2511":
        dit_sd[INDEX_TIMESTEP_ZERO] = torch.tensor([])
    save_file(dit_sd, dm / f"qwen_image_{version.replace('-', '_')}_tiny.safetensors")
    te_sd = {legacy_te_key(k): v for k, v in state(vl).items()}
    save_file({k: v for k, v in te_sd.items() if k is not None}, te / "qwen_2.5_vl_tiny.safetensors")
    save_file({diffusers_to_wan(k, 2): v for k, v in state(vae).items()}, vae_dir / "qwen_image_vae_tiny.safetensors")
    return comfy
