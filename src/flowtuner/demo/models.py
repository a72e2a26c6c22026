"""The demo's tiny model set, built locally (no download): a byte-level BPE tokenizer trained on the
captions and the prompt template, a tiny Qwen2.5-VL text encoder, a tiny Qwen-Image VAE trained
briefly for reconstruction, and a tiny Qwen-Image DiT. Saved as a Hugging Face repo root, so every
later step loads it exactly as it would load the real models."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from flowtuner.families.qwen_image.text_encoder import T2I_TEMPLATE

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
TEXT_WIDTH = 128
VAE_BATCH, VAE_CROP, VAE_LR = 16, 32, 3e-3


def build_tokenizer(folder: Path, captions: list[str], template=T2I_TEMPLATE.format) -> int:
    """A Qwen2-style byte-level BPE over the demo's words in the prompt template `template(caption)`; returns the
    vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    corpus = [template(c) for c in sorted(set(captions))] + ["user\n", "assistant\n", " "]
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
        # the real model's special ids are outside this vocabulary: transformers would warn about them
        text_config=dict(vocab_size=64 * math.ceil(vocab / 64), hidden_size=TEXT_WIDTH, intermediate_size=256,
                         bos_token_id=SPECIAL_TOKENS.index("<|endoftext|>"), eos_token_id=SPECIAL_TOKENS.index("<|im_end|>"),
                         num_hidden_layers=2, num_attention_heads=1, num_key_value_heads=1, rms_norm_eps=1e-6,
                         max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TEXT_WIDTH,
                           fullatt_block_indexes=[0]),
        # the vision tokens' ids in this tokenizer (the real model's are 151652-151656)
        image_token_id=SPECIAL_TOKENS.index("<|image_pad|>"), video_token_id=SPECIAL_TOKENS.index("<|video_pad|>"),
        vision_start_token_id=SPECIAL_TOKENS.index("<|vision_start|>"), vision_end_token_id=SPECIAL_TOKENS.index("<|vision_end|>"))
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(folder)
    # An edit model reads control images through the VL processor; its pixel limit here keeps the demo's image to
    # 16 vision tokens (the released processor allows 65,536: the DiT would see 200 per control at 384x384).
    (folder.parent / "processor").mkdir(parents=True, exist_ok=True)
    (folder.parent / "processor" / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 56 * 56, "max_pixels": 112 * 112,
         "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}, indent=1))


def build_dit(folder: Path, seed: int, layers: int) -> None:
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=layers, attention_head_dim=128,
                                num_attention_heads=2, joint_attention_dim=TEXT_WIDTH,
                                axes_dims_rope=(16, 56, 56)).save_pretrained(folder)


def pixel_batch(paths: list[Path]) -> torch.Tensor:
    """The images as [B, 3, H, W] in [-1, 1]."""
    arrays = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 127.5 - 1 for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def _pixels(paths: list[Path]) -> torch.Tensor:
    return pixel_batch(paths).unsqueeze(2)  # [B, 3, 1, H, W]: the Qwen VAE's single frames


def _decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """The decoder without its final clamp to [-1, 1], whose zero gradient outside the range stalls training."""
    vae.clear_cache()
    vae._conv_idx = [0]
    out = vae.decoder(vae.post_quant_conv(z), feat_cache=vae._feat_map, feat_idx=vae._conv_idx)
    vae.clear_cache()
    return out


@contextlib.contextmanager
def single_frame_convs(vae):
    """Within the block, the VAE's causal 3D convolutions run as 2D ones on one-frame input. A causal
    convolution pads time with zeros before the frame, so on a single frame only the kernel's last
    temporal slice meets data: the 2D convolution with that slice gives the same output and the same
    gradients (the other slices get zero either way) for a third of the work. Any other input (several
    frames, a cached previous chunk) takes the layer's own path. Yields the number of layers switched."""
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d

    def two_d(conv):
        original = conv.forward

        def forward(x, cache_x=None):
            if x.shape[2] != 1 or cache_x is not None:
                return original(x, cache_x)
            x = F.pad(x[:, :, 0], conv._padding[:4])
            return F.conv2d(x, conv.weight[:, :, -1], conv.bias, stride=conv.stride[1:]).unsqueeze(2)

        return forward

    convs = [m for m in vae.modules() if isinstance(m, QwenImageCausalConv3d)
             and m._padding[4] == m.kernel_size[0] - 1 and m.dilation == (1, 1, 1) and m.padding_mode == "zeros"]
    for conv in convs:
        conv.forward = two_d(conv)
    try:
        yield len(convs)
    finally:
        for conv in convs:
            del conv.forward  # back to the class's method


def _identity_residuals(vae) -> None:
    """Every residual and attention block of the VAE starts as the identity (its last layer zeroed, as
    diffusion UNets start theirs). With the default init the few-channel RMS norms of this tiny VAE wash
    the input out of the latent (under 1 % of the latent's variance depends on the image), and training
    sits on a plateau that outputs flat grey for a number of steps that chance decides (from 40 to over
    1000 seen); from identity blocks every seed tried descends from the first steps."""
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageAttentionBlock, QwenImageResidualBlock

    with torch.no_grad():
        for m in vae.modules():
            last = m.conv2 if isinstance(m, QwenImageResidualBlock) else m.proj if isinstance(m, QwenImageAttentionBlock) else None
            if last is not None:
                last.weight.zero_()
                last.bias.zero_()


def random_crops(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """One random size x size crop per image, at offsets on the VAE's 8-pixel grid."""
    if size >= x.shape[-1]:
        return x
    offsets = (torch.randint(0, (x.shape[-1] - size) // 8 + 1, (len(x), 2), generator=gen) * 8).tolist()
    return torch.stack([img[..., y : y + size, x0 : x0 + size] for img, (y, x0) in zip(x, offsets)])


def vae_optimizer(vae, steps: int):
    """Adam with warm-up and cosine decay (the caller clips): without warm-up and clipping Adam's first full-size
    steps can knock a tiny VAE into a plateau that loses the colours, and a demo's denoiser cannot draw what its
    VAE cannot represent."""
    opt = torch.optim.Adam(vae.parameters(), lr=VAE_LR, betas=(0.9, 0.99))
    warmup = max(1, steps // 12)
    decay = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=warmup),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps - warmup), eta_min=1e-4)], milestones=[warmup])
    return opt, decay


def train_vae(folder: Path, images: list[Path], steps: int, seed: int) -> float:
    """A tiny VAE trained for reconstruction, as a plain autoencoder on the posterior mode (the latent the
    caches use); its latent mean / std are measured on the data and stored in its config, as the real
    one's are. Returns the reconstruction MSE over the whole images (pixels in [-1, 1]).

    Cheap by construction (docs/performance.md has the numbers): it is fully convolutional and only has to
    learn flat colours and edges, so it trains on 32x32 crops, with 2D convolutions (single_frame_convs),
    from identity residual blocks."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                                 temperal_downsample=[False, True, True])
    _identity_residuals(vae)
    data = _pixels(images)
    opt, decay = vae_optimizer(vae, steps)
    gen = torch.Generator().manual_seed(seed)
    with single_frame_convs(vae):
        for _ in tqdm(range(steps), desc="training the demo VAE", unit="step"):
            x = random_crops(data[torch.randint(0, len(data), (VAE_BATCH,), generator=gen)], VAE_CROP, gen)
            loss = F.mse_loss(_decode_unclamped(vae, vae.encode(x).latent_dist.mode()), x)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            decay.step()
        with torch.no_grad():
            z = torch.cat([vae.encode(data[i : i + 32]).latent_dist.mode() for i in range(0, len(data), 32)])
            mse = sum(F.mse_loss(_decode_unclamped(vae, z[i : i + 32]), data[i : i + 32], reduction="sum").item()
                      for i in range(0, len(data), 32)) / data.numel()
    mean = z.mean(dim=(0, 2, 3, 4))
    std = z.std(dim=(0, 2, 3, 4)).clamp_min(1e-3)
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    vae.save_pretrained(folder)
    return mse


def build_repo(root: Path, captions: list[str], images: list[Path], seed: int, vae_steps: int, dit_layers: int, clock,
               template=T2I_TEMPLATE.format) -> dict:
    vocab = clock.run("tokenizer", build_tokenizer, root / "tokenizer", captions, template)
    clock.run("text encoder", build_text_encoder, root / "text_encoder", vocab, seed)
    mse = clock.run("VAE training", train_vae, root / "vae", images, vae_steps, seed)
    clock.run("DiT", build_dit, root / "transformer", seed, dit_layers)
    return {"vocab": vocab, "vae_mse": mse}
