"""Real-width Qwen-Image files with very few layers, for ComfyUI's native loaders.

ComfyUI detects Qwen-Image by its real widths (DiT 3072 / text 3584 / Wan VAE dim 96) and rejects the tiny
models with size mismatches, so its native path (CLIPLoader type qwen_image, UNETLoader, KSampler, VAEDecode) is
tested on these: the DiT 3072 wide with one block, the text encoder 3584 wide with two layers (the 152064 x 3584
vocabulary embedding included), the real VAE architecture; random weights in bf16, saved in ComfyUI's single-file
layouts (the text encoder in the legacy qwen_2.5_vl_7b key layout, no lm_head, no vision tower: text-to-image
never runs it). Weights are drawn straight into a state dict from the architecture's shapes (meta device).
dtypes: DiT and VAE float32 (ComfyUI computes them in float32 on the CPU whatever the file holds and flowtuner in
the file's dtype, so float32 files give both sides the same arithmetic), the text encoder bf16 (its vocabulary
embedding is 1.1 GB so; both sides then run it in bf16). Files: DiT 1.5 GB, text encoder 2.0 GB, VAE 0.5 GB.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
from safetensors.torch import save_file
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from flowtuner.families.qwen_image.vae_keys import diffusers_to_wan
from tests.layouts import legacy_te_key

DIT = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=1, attention_head_dim=128, num_attention_heads=24,
           joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
TEXT_LAYERS = 2
TEXT = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=TEXT_LAYERS,
            num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6, max_position_embeddings=128000,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
VISION = dict(depth=1, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, fullatt_block_indexes=[0])
FILES = {"dit": "diffusion_models/qwen_image_realwidth_1block.safetensors",
         "te": "text_encoders/qwen_2.5_vl_realwidth_2layers.safetensors",
         "vae": "vae/qwen_image_vae_realwidth.safetensors"}


def random_state(shapes: dict[str, torch.Size], seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random weights that keep activations O(1) through any depth: matrices N(0, 1/fan_in), norm scales 1,
    biases and other vectors N(0, 0.02^2) (embedding rows N(0, 1))."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        if "norm" in key and key.endswith("weight") and len(shape) == 1:
            t = torch.ones(shape)
        elif len(shape) == 1:
            t = torch.randn(shape, generator=g) * 0.02
        elif "embed_tokens" in key:
            t = torch.randn(shape, generator=g)
        else:
            fan_in = int(torch.Size(shape[1:]).numel())
            t = torch.randn(shape, generator=g) * fan_in**-0.5
        out[key] = t.to(dtype).contiguous()
    return out


def _shapes(module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in module.state_dict().items()}


def dit_shapes() -> dict[str, torch.Size]:
    with init_empty_weights():
        return _shapes(QwenImageTransformer2DModel(**DIT))


def dit_state(seed: int = 0) -> dict[str, torch.Tensor]:
    return random_state(dit_shapes(), seed, torch.float32)


def text_encoder_state(seed: int = 1) -> dict[str, torch.Tensor]:
    """The language model in ComfyUI's (legacy) key layout: model.embed_tokens, model.layers.N, model.norm."""
    with init_empty_weights():
        te = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=TEXT, vision_config=VISION))
    shapes = {legacy_te_key(k): s for k, s in _shapes(te).items()}
    return random_state({k: s for k, s in shapes.items() if k is not None and not k.startswith("visual.")}, seed, torch.bfloat16)


def vae_state(seed: int = 2) -> dict[str, torch.Tensor]:
    """The real Qwen-Image (Wan 2.1) VAE architecture, diffusers' own init, in the Wan layout ComfyUI ships."""
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage()  # diffusers' defaults are the released config
    return {diffusers_to_wan(k, 2): v.detach().contiguous() for k, v in vae.state_dict().items()}


BUILDERS = {"dit": dit_state, "te": text_encoder_state, "vae": vae_state}


def build(models: Path) -> dict:
    """Write the three files under `models` (ComfyUI's models/ folder layout); returns their paths and
    per-file build seconds and sizes."""
    out = {"paths": {}, "seconds": {}, "bytes": {}}
    for name, rel in FILES.items():
        path = models / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        state = BUILDERS[name]()
        save_file(state, str(path))
        del state
        out["paths"][name] = path
        out["seconds"][name] = time.perf_counter() - start
        out["bytes"][name] = path.stat().st_size
    return out


def cached_build() -> dict:
    """The files built once per machine and builder version (keyed by this file's source hash), in the temp dir:
    a staging folder renamed into place, so an interrupted build is never reused. `seconds` is what this call
    spent (0-ish when reused), `built` whether it built."""
    digest = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
    root = Path(tempfile.gettempdir()) / "flowtuner-realwidth" / digest
    if not all((root / "models" / rel).is_file() for rel in FILES.values()):
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=".build-"))
        result = build(staging / "models")
        try:
            staging.rename(root)
        except OSError:  # built meanwhile by another process, or a stale incomplete folder: keep ours
            shutil.rmtree(root, ignore_errors=True)
            staging.rename(root)
        result["paths"] = {name: root / "models" / rel for name, rel in FILES.items()}
        return {**result, "built": True}
    paths = {name: root / "models" / rel for name, rel in FILES.items()}
    return {"paths": paths, "seconds": {}, "bytes": {n: p.stat().st_size for n, p in paths.items()}, "built": False}
