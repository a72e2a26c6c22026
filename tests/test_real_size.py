"""Real-size structure on the meta device: the 20.43 B DiT and the 8.29 B text encoder are covered
key for key by the loaders' key mapping and config inference, without allocating memory."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLTextModel

from flowtuner.families.qwen_image.dit import inspect_dit, module_key
from flowtuner.families.qwen_image.text_encoder import infer_text_config, language_model_view
from flowtuner.families.qwen_image.vae import infer_config as infer_vae_config
from flowtuner.families.qwen_image.vae_keys import diffusers_to_wan, wan_num_res_blocks, wan_to_diffusers
from flowtuner.weights.reader import Checkpoint, TensorEntry
from tests.layouts import legacy_te_key

REAL_DIT = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
# Qwen/Qwen2.5-VL-7B-Instruct config.json (the text encoder of Qwen-Image)
REAL_TE = dict(
    text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6, max_position_embeddings=128000,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31]),
)


def fake_checkpoint(shapes: dict[str, tuple[int, ...]], prefix: str = "") -> Checkpoint:
    entries = {prefix + k: TensorEntry(Path("meta"), torch.bfloat16, tuple(s), 0, 0) for k, s in shapes.items()}
    return Checkpoint(Path("real-size.safetensors"), entries)


def meta_shapes(module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_real_dit_keys_and_config_on_meta():
    with init_empty_weights():
        real = QwenImageTransformer2DModel(**REAL_DIT)
    assert sum(p.numel() for p in real.parameters()) == 20_430_401_088
    shapes = meta_shapes(real)
    for prefix in ("", "model.diffusion_model."):
        info = inspect_dit(fake_checkpoint(shapes, prefix))
        assert info.prefix == prefix
        assert {k: info.config[k] for k in REAL_DIT} == REAL_DIT
        mapped = {module_key(k, info.block_remap) for k in shapes}
        assert mapped == set(shapes)


def test_pruned_dit_is_renumbered_and_2511_marker_kept():
    with init_empty_weights():
        real = QwenImageTransformer2DModel(**{**REAL_DIT, "num_layers": 4})
    shapes = {k.replace("transformer_blocks.3.", "transformer_blocks.9."): s for k, s in meta_shapes(real).items()}
    shapes["__index_timestep_zero__"] = (0,)
    info = inspect_dit(fake_checkpoint(shapes))
    assert info.config["num_layers"] == 4 and info.index_timestep_zero
    assert module_key("transformer_blocks.9.attn.to_q.weight", info.block_remap) == "transformer_blocks.3.attn.to_q.weight"


def test_real_text_encoder_legacy_layout_on_meta():
    with init_empty_weights():
        full = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**REAL_TE))
    assert sum(p.numel() for p in full.parameters()) == 8_292_166_656
    legacy = {legacy_te_key(k): s for k, s in meta_shapes(full).items()}
    comfy = fake_checkpoint({k: s for k, s in legacy.items() if k is not None})  # ComfyUI file: no lm_head
    for ckpt in (comfy, fake_checkpoint(meta_shapes(full))):  # legacy and new layouts
        lm = language_model_view(ckpt)
        config = infer_text_config(lm)
        want = REAL_TE["text_config"]
        assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
                config.intermediate_size, config.vocab_size) == (want["hidden_size"], want["num_hidden_layers"],
                want["num_attention_heads"], want["num_key_value_heads"], want["intermediate_size"], want["vocab_size"])
        with init_empty_weights():
            text = Qwen2_5_VLTextModel(config)
        lm_keys = {k for k in lm.keys() if k.split(".")[0] in ("embed_tokens", "layers", "norm")}
        assert lm_keys == set(text.state_dict())
        assert all(lm.shape(k) == tuple(v.shape) for k, v in text.state_dict().items())


def test_real_vae_keys_both_ways_and_against_diffusers_converter():
    with init_empty_weights():
        real = AutoencoderKLQwenImage()
    keys = list(real.state_dict())
    wan = [diffusers_to_wan(k, 2) for k in keys]
    assert len(set(wan)) == len(wan) == 194
    assert [wan_to_diffusers(k, wan_num_res_blocks(wan)) for k in wan] == keys
    assert convert_wan_vae_to_diffusers({k: k for k in wan}) == {wan_to_diffusers(k, 2): k for k in wan}
    config = infer_vae_config(meta_shapes(real))
    for key in ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample", "input_channels"):
        assert config[key] == real.config[key], key
