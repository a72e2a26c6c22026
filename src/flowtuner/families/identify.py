"""What a checkpoint looks like, from its key names alone: used to tell a user which file went into
the wrong slot ("--dit got a Qwen-Image VAE"). A table of (description, marker keys)."""

from __future__ import annotations

from flowtuner.weights.reader import Checkpoint

# First match wins; a row matches when every marker is a key, or (marker ending in '*') a key prefix.
KINDS: list[tuple[str, tuple[str, ...]]] = [
    ("a ComfyUI all-in-one Qwen-Image checkpoint (DiT + VAE + text encoder)",
     ("model.diffusion_model.txt_norm.weight", "text_encoders.qwen25_7b.transformer.*")),
    ("a Qwen-Image DiT", ("txt_norm.weight", "transformer_blocks.0.img_mod.1.weight")),
    ("a Qwen-Image DiT (ComfyUI prefix)", ("model.diffusion_model.txt_norm.weight",)),
    ("a Qwen-Image VAE (diffusers layout)", ("decoder.norm_out.gamma", "quant_conv.weight")),
    ("an SD / SDXL VAE", ("decoder.conv_in.weight", "decoder.norm_out.weight")),
    ("a Qwen-Image / Wan-2.1 VAE (original layout)", ("encoder.conv1.weight", "decoder.middle.0.residual.0.gamma")),
    ("a Qwen2.5-VL text encoder (legacy layout)", ("model.layers.0.self_attn.k_proj.bias",)),
    ("a Qwen2.5-VL text encoder", ("model.language_model.layers.0.self_attn.k_proj.bias",)),
    ("an SDXL checkpoint (UNet + VAE + CLIP-L + OpenCLIP-bigG)",
     ("model.diffusion_model.label_emb.0.0.weight", "conditioner.embedders.1.model.*")),
    ("an SD 1.5 checkpoint", ("model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.*")),
    ("an SDXL / SD checkpoint", ("model.diffusion_model.input_blocks.0.0.weight",)),
    ("an SDXL / SD UNet", ("input_blocks.0.0.weight",)),
    ("an SDXL UNet (diffusers layout)", ("conv_in.weight", "down_blocks.*", "mid_block.*")),
    ("a Flux DiT", ("double_blocks.0.img_attn.qkv.weight",)),
    ("a Flux DiT (ComfyUI prefix)", ("model.diffusion_model.double_blocks.0.img_attn.qkv.weight",)),
    ("a CLIP text encoder", ("text_model.embeddings.token_embedding.weight",)),
    ("a LoRA", ("*lora_down.weight",)),
    ("a LoRA (PEFT layout)", ("*lora_A.weight",)),
]


def _has(keys: set[str], marker: str) -> bool:
    if marker.startswith("*"):
        return any(k.endswith(marker[1:]) for k in keys)
    if marker.endswith("*"):
        return any(k.startswith(marker[:-1]) for k in keys)
    return marker in keys


def describe(ckpt: Checkpoint) -> str:
    keys = set(ckpt.keys())
    for description, markers in KINDS:
        if all(_has(keys, m) for m in markers):
            return description
    if not keys:
        return "an empty checkpoint (no tensors)"
    first = sorted(keys)[0]
    return f"an unrecognised checkpoint ({len(keys)} tensors, first key {first!r})"
