"""The demo's tiny model set, built locally (no download): a byte-level BPE tokenizer trained on the
captions and the prompt template, a tiny Qwen2.5-VL text encoder, a tiny Qwen-Image VAE trained
briefly for reconstruction, and a tiny Qwen-Image DiT. Saved as a Hugging Face repo root, so every
later step loads it exactly as it would load the real models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from flowtuner.families.qwen_image.text_encoder import T2I_TEMPLATE

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
TEXT_WIDTH = 128


def build_tokenizer(folder: Path, captions: list[str]) -> int:
    """A Qwen2-style byte-level BPE over the demo's words; returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    corpus = [T2I_TEMPLATE.format(c) for c in sorted(set(captions))] + ["user\n", "assistant\n", " "]
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus * 4, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.model.save(str(folder))
    decoder = {str(tok.token_to_id(t)): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                         "normalized": False, "single_word": False} for t in SPECIAL_TOKENS}
    config = {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "bos_token": None, "unk_token": None, "additional_special_tokens": SPECIAL_TOKENS[1:], "add_bos_token": False,
              "errors": "replace", "split_special_tokens": False, "model_max_length": 32768, "added_tokens_decoder": decoder}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return tok.get_vocab_size()


def build_text_encoder(folder: Path, vocab: int, seed: int) -> None:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=64 * math.ceil(vocab / 64), hidden_size=TEXT_WIDTH, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=1, num_key_value_heads=1, rms_norm_eps=1e-6,
                         max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TEXT_WIDTH,
                           fullatt_block_indexes=[0]))
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(folder)


def build_dit(folder: Path, seed: int, layers: int) -> None:
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=layers, attention_head_dim=128,
                                num_attention_heads=2, joint_attention_dim=TEXT_WIDTH,
                                axes_dims_rope=(16, 56, 56)).save_pretrained(folder)


def _pixels(paths: list[Path]) -> torch.Tensor:
    arrays = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 127.5 - 1 for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).unsqueeze(2)  # [B, 3, 1, H, W]


def _decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """The decoder without its final clamp to [-1, 1], whose zero gradient outside the range stalls training."""
    vae.clear_cache()
    vae._conv_idx = [0]
    out = vae.decoder(vae.post_quant_conv(z), feat_cache=vae._feat_map, feat_idx=vae._conv_idx)
    vae.clear_cache()
    return out


def train_vae(folder: Path, images: list[Path], steps: int, seed: int) -> float:
    """A tiny VAE trained for reconstruction, as a plain autoencoder on the posterior mode (the latent the
    caches use); its latent mean / std are measured on the data and stored in its config, as the real
    one's are. Returns the final reconstruction MSE (pixels in [-1, 1])."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                                 temperal_downsample=[False, True, True])
    data = _pixels(images)
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3, betas=(0.9, 0.99))
    # Warm-up and clipping: without them Adam's first full-size steps sometimes knock this tiny VAE into a
    # plateau that loses the colours (MSE 0.075 instead of 0.016, seen with torch 2.11 on a 16-core CPU),
    # and the demo's DiT cannot draw what the VAE cannot represent.
    warmup = max(1, steps // 12)
    decay = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=warmup),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps - warmup), eta_min=1e-4)], milestones=[warmup])
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in tqdm(range(steps), desc="training the demo VAE", unit="step"):
        x = data[torch.randint(0, len(data), (8,), generator=gen)]
        loss = torch.nn.functional.mse_loss(_decode_unclamped(vae, vae.encode(x).latent_dist.mode()), x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        decay.step()
        losses.append(loss.item())
    with torch.no_grad():
        z = torch.cat([vae.encode(data[i : i + 32]).latent_dist.mode() for i in range(0, len(data), 32)])
    mean = z.mean(dim=(0, 2, 3, 4))
    std = z.std(dim=(0, 2, 3, 4)).clamp_min(1e-3)
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    vae.save_pretrained(folder)
    return sum(losses[-20:]) / len(losses[-20:])


def build_repo(root: Path, captions: list[str], images: list[Path], seed: int, vae_steps: int, dit_layers: int) -> dict:
    vocab = build_tokenizer(root / "tokenizer", captions)
    build_text_encoder(root / "text_encoder", vocab, seed)
    mse = train_vae(root / "vae", images, vae_steps, seed)
    build_dit(root / "transformer", seed, dit_layers)
    return {"vocab": vocab, "vae_mse": mse}
