"""`flowtuner demo --family sdxl`: the bigASP v2.5 conversion in miniature. A tiny SDXL (the real UNet, VAE and
CLIP-L + OpenCLIP-bigG architectures at small widths) is trained briefly as an ordinary eps-prediction model on
the procedural shapes, sampled and scored (the measured starting point), then fine-tuned into a rectified-flow
model (`finetune --prediction_type flow`: the recipe's shifted logit-normal sigma, 1000 sigma timesteps, target
eps - x0), sampled with flow sampling and scored again. Every step after building the models goes through the
CLI a user types; the converted model is an SDXL single-file checkpoint (ComfyUI's loader + ModelSamplingSD3)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from flowtuner.demo.dataset import classify, write_dataset
from flowtuner.demo.models import VAE_BATCH, VAE_CROP, pixel_batch, random_crops, vae_optimizer

# The UNet keeps SDXL's structure (a plain first stage, two cross-attention stages, the text_time embedding of
# size, crop and pooled text) at widths a CPU trains in a minute: 8x8 latents of the 64 px images.
UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    # 64 channels in the first stage, two per GroupNorm group: its output norm (32 groups) then keeps each
    # channel's level relative to its pair, which one channel per group (a width of 32) erases -- the absolute level
    # is what sets a flat colour (docs/sdxl.md "Demo")
    block_out_channels=[64, 64, 64], layers_per_block=1, transformer_layers_per_block=[1, 1, 1],
    # 64-channel heads and 32 GroupNorm groups: what a loader infers for any SDXL file (families/sdxl/configs.py)
    attention_head_dim=[1, 1, 1], norm_num_groups=32, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256,
)
CLIP_L_WIDTH, CLIP_G_WIDTH, CLIP_G_PROJECTION = 64, 128, 64
CLIP_VOCAB = 49408  # the real vocabulary size and special ids, so every CLIP code path reads these files unchanged
VAE = dict(block_out_channels=[32, 32, 32, 32], layers_per_block=1, latent_channels=4, norm_num_groups=32,
           down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, sample_size=64)
SDXL_SCALE = 0.13025  # every SDXL loader's latent scale (configs.SCALING_FACTOR); the demo VAE is fitted to it


# ---------------------------------------------------------------- tokenizer

def build_clip_tokenizer(folder: Path, captions: list[str]) -> Path:
    """A CLIP-format BPE tokenizer (vocab.json + merges.txt, read by transformers' CLIPTokenizer) whose merges make
    each of the demo's words one token, as the real CLIP vocabulary does for these words. It keeps the real
    vocabulary's shape: 49408 ids, every byte (alone and word-final) so any text tokenizes, <|startoftext|> and
    <|endoftext|> at 49406 / 49407 -- the ids the SDXL family's chunking writes."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=4096, end_of_word_suffix="</w>", initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(sorted(set(captions)) * 4, trainer)
    trained = json.loads(tok.to_str())["model"]
    ordered = sorted(alphabet) + [c + "</w>" for c in sorted(alphabet)]
    ordered += [t for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]) if t not in set(ordered)]
    ordered += [f"<|unused{i}|>" for i in range(CLIP_VOCAB - 2 - len(ordered))]
    ordered += ["<|startoftext|>", "<|endoftext|>"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in trained["merges"]]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(ordered)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def demo_tokenizer(folder: Path, captions: list[str], given: str | None) -> tuple[Path, str]:
    """(tokenizer folder, what it is): --tokenizer's real CLIP files when given (checked as the family checks
    them), else the demo's own vocabulary built in `folder`."""
    if given:
        from flowtuner.families.sdxl.tokenizer import load_tokenizer

        load_tokenizer(Path(given))  # one line if it is not SDXL's CLIP tokenizer
        return Path(given), f"the CLIP tokenizer in {given}"
    return build_clip_tokenizer(folder, captions), "the demo's CLIP-format vocabulary of its own words"


# ---------------------------------------------------------------- models

def _clip(cls, width: int, layers: int, heads: int, act: str, projection: int, seed: int):
    from transformers import CLIPTextConfig

    torch.manual_seed(seed)
    model = cls(CLIPTextConfig(vocab_size=CLIP_VOCAB, hidden_size=width, intermediate_size=2 * width,
                               num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                               hidden_act=act, projection_dim=projection, bos_token_id=0, eos_token_id=2, pad_token_id=1))
    # A trained CLIP's token features stand well above its position features; at transformers' init (both std
    # 0.02) the words hardly move the penultimate states the UNet reads. Unit-scale token embeddings do.
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 1.0)
    return model.eval()


def text_encoders(seed: int):
    """(CLIP-L, OpenCLIP-bigG) as transformers' classes, random and frozen (SDXL training never updates them)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    clip_l = _clip(CLIPTextModel, CLIP_L_WIDTH, 3, 1, "quick_gelu", CLIP_L_WIDTH, seed)
    clip_g = _clip(CLIPTextModelWithProjection, CLIP_G_WIDTH, 3, 2, "gelu", CLIP_G_PROJECTION, seed + 1)
    return clip_l, clip_g


def unet(seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET, cross_attention_dim=CLIP_L_WIDTH + CLIP_G_WIDTH,
                                projection_class_embeddings_input_dim=6 * UNET["addition_time_embed_dim"] + CLIP_G_PROJECTION)


def _identity_resnets(vae) -> None:
    """Residual and attention blocks start as the identity (last layer zeroed), as in the Qwen demo's VAE: the
    image reaches the latent from the first step instead of after a plateau of chance length."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    with torch.no_grad():
        for m in vae.modules():
            last = m.conv2 if isinstance(m, ResnetBlock2D) else m.to_out[0] if isinstance(m, Attention) else None
            if last is not None:
                last.weight.zero_()
                last.bias.zero_()


def fold_latent_scale(vae, z: torch.Tensor) -> None:
    """Make the VAE's latents (z - mean) / std per channel at SDXL's fixed scale 0.13025, inside the VAE itself:
    quant_conv's mean rows become (W z + b - m) c, its log-variance rows move by 2 ln c, post_quant_conv reads
    z / c + m, c = 1 / (0.13025 std). Every SDXL loader (flowtuner's, ComfyUI's) assumes 0.13025 and no shift, so
    the single-file checkpoint then decodes and encodes the same everywhere."""
    mean, std = z.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3)).clamp_min(1e-3)
    c = 1.0 / (SDXL_SCALE * std)
    n = len(mean)
    with torch.no_grad():
        q, post = vae.quant_conv, vae.post_quant_conv
        q.bias[:n] = (q.bias[:n] - mean) * c
        q.weight[:n] *= c[:, None, None, None]
        q.bias[n:] += 2 * torch.log(c)
        post.bias += (post.weight[:, :, 0, 0] @ mean)
        post.weight /= c[None, :, None, None]


def train_vae(images: list[Path], steps: int, seed: int):
    """A tiny AutoencoderKL trained as a plain autoencoder on the posterior mode (what the caches encode), on
    random 32x32 crops (it is fully convolutional and only learns flat colours and edges). Returns (vae, MSE over
    the whole images with pixels in [-1, 1], how many reconstructions keep their shape colour)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE, scaling_factor=SDXL_SCALE, force_upcast=True)
    _identity_resnets(vae)
    data = pixel_batch(images)
    opt, decay = vae_optimizer(vae, steps)
    gen = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="training the demo VAE", unit="step"):
        x = random_crops(data[torch.randint(0, len(data), (VAE_BATCH,), generator=gen)], VAE_CROP, gen)
        # decoded without a clamp: its zero gradient outside [-1, 1] would stall training
        loss = F.mse_loss(vae.decode(vae.encode(x).latent_dist.mode()).sample, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        decay.step()
    vae.eval()
    refit_output_layer(vae, data)
    with torch.no_grad():
        z = torch.cat([vae.encode(data[i : i + 32]).latent_dist.mode() for i in range(0, len(data), 32)])
        fold_latent_scale(vae, z)
        recon = torch.cat([vae.decode(vae.encode(data[i : i + 32]).latent_dist.mode()).sample
                           for i in range(0, len(data), 32)])
    mse = F.mse_loss(recon, data).item()
    return vae, mse, reconstructed_colours(images, recon)


def refit_output_layer(vae, data: torch.Tensor, ridge: float = 1e-3) -> None:
    """The decoder's last convolution refitted by least squares on the whole images. It reads the output of a
    GroupNorm of one channel per group (SDXL's 32 groups at 32 channels), whose per-image statistics differ between
    the 32x32 training crops and the whole 64x64 images the demo decodes; the fit on whole images removes that
    mismatch exactly, for the price of one pass over the data."""
    conv = vae.decoder.conv_out
    seen = []
    hook = conv.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0]))
    n = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] + 1
    xtx, xty = torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, conv.out_channels, dtype=torch.float64)
    try:
        with torch.no_grad():
            for i in range(0, len(data), 32):
                seen.clear()
                vae.decode(vae.encode(data[i : i + 32]).latent_dist.mode())
                cols = F.unfold(seen[0], conv.kernel_size, padding=conv.padding).transpose(1, 2).reshape(-1, n - 1)
                x = torch.cat([cols, torch.ones(len(cols), 1)], 1).double()
                y = data[i : i + 32].permute(0, 2, 3, 1).reshape(-1, conv.out_channels).double()
                xtx += x.T @ x
                xty += x.T @ y
    finally:
        hook.remove()
    # a small ridge per image: a feature that training left constant cannot make the system singular
    w = torch.linalg.solve(xtx + ridge * len(data) * torch.eye(n, dtype=torch.float64), xty).T.float()
    with torch.no_grad():
        conv.weight.copy_(w[:, :-1].reshape(conv.weight.shape))
        conv.bias.copy_(w[:, -1])


def reconstructed_colours(images: list[Path], recon: torch.Tensor) -> int:
    """How many reconstructions the demo's classifier reads as their image's shape colour: the ceiling of what the
    UNet's samples can score through this VAE (the stems start with the colour: dataset.write_dataset)."""
    pixels = ((recon.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return sum(classify(Image.fromarray(p)) == path.name.split("_")[0] for path, p in zip(images, pixels))


def build_checkpoint(path: Path, images: list[Path], seed: int, vae_steps: int, clock) -> dict:
    """The untrained eps model as users have SDXL: one single-file checkpoint (ldm names) with the trained VAE."""
    from flowtuner.families.sdxl.checkpoint import save_checkpoint

    vae, mse, colours = clock.run("VAE training", train_vae, images, vae_steps, seed)
    clip_l, clip_g = text_encoders(seed)
    save_checkpoint(path, unet(seed + 2), vae, clip_l, clip_g)
    return {"vae_mse": mse, "vae_colours": f"{colours}/{len(images)}"}


# ---------------------------------------------------------------- the run

def run_sdxl_demo(cfg) -> dict:
    from flowtuner.demo.runner import GOAL, PER_COMBINATION, SIZE, Stopwatch, _prompts, _step

    clock = Stopwatch()
    out = Path(cfg.output_dir)
    images = out / "dataset"
    captions = clock.run("dataset", write_dataset, images, SIZE, PER_COMBINATION, cfg.seed)
    print(f"dataset: {len(captions)} images in {images}")
    models = out / "models"
    tokenizer, which = clock.run("tokenizer", demo_tokenizer, models / "tokenizer", captions, cfg.tokenizer)
    base = models / "tiny_sdxl_untrained.safetensors"
    built = build_checkpoint(base, sorted(images.glob("*.png")), cfg.seed, cfg.vae_steps, clock)
    print(f"tiny SDXL in {base} (tokenizer: {which}); VAE reconstruction MSE {built['vae_mse']:.4f}, "
          f"colour kept in {built['vae_colours']} images")
    config = out / "dataset.toml"
    config.write_text(f'[general]\nresolution = {SIZE}\ncaption_extension = ".txt"\nbatch_size = {cfg.batch_size}\n\n'
                      f'[[datasets]]\nimage_directory = "{images}"\ncache_directory = "{out / "cache"}"\n')
    family = ["--model_version", "sdxl", "--device", cfg.device]
    text = ["--tokenizer", str(tokenizer)]
    data = ["--dataset_config", str(config)]
    clock.run("dataset check", _step, "dataset check", ["dataset", "check", *data, "--preview", str(out / "preview")])
    clock.run("cache latents", _step, "cache latents", ["cache-latents", *data, "--model", str(base), *family])
    clock.run("cache text", _step, "cache text", ["cache-text", *data, "--model", str(base), *family, *text])
    prompts = _prompts(out, cfg)
    common = ["--max_data_loader_n_workers", "0", "--seed", str(cfg.seed), "--save_precision", "fp32",
              "--lr_scheduler", "cosine", "--lr_warmup_steps", "0.05", "--learning_rate", str(cfg.learning_rate)]

    # stage 1: an ordinary eps-prediction SDXL (kohya's uniform timesteps on the DDPM table)
    eps = out / "eps"
    clock.run("train eps", _step, "train eps", [
        "finetune", *data, "--model", str(base), *family, *text, "--prediction_type", "eps", "--output_dir", str(eps),
        "--output_name", "sdxl_eps", "--max_train_steps", str(cfg.eps_steps), *common])
    eps_model = eps / "sdxl_eps.safetensors"
    clock.run("sample eps", _step, "sample eps", [
        "generate", "--model", str(eps_model), *family, *text, "--prediction_type", "eps", "--from_file", str(prompts),
        "--image_size", str(SIZE), str(SIZE), "--infer_steps", str(cfg.sample_steps), "--guidance_scale", "1.0",
        "--num_images", str(cfg.samples_per_prompt), "--save_path", str(out / "samples_eps")])

    # stage 2: the conversion (the recipe's objective from the eps checkpoint), sampled as bigASP v2.5 is
    flow = out / "flow"
    clock.run("train flow", _step, "train flow", [
        "finetune", *data, "--model", str(eps_model), *family, *text, "--prediction_type", "flow", "--output_dir", str(flow),
        "--output_name", "sdxl_flow", "--max_train_steps", str(cfg.train_steps), *common])
    flow_model = flow / "sdxl_flow.safetensors"
    clock.run("sample flow", _step, "sample flow", [
        "generate", "--model", str(flow_model), *family, *text, "--preset", "bigasp", "--shift", str(cfg.flow_shift),
        "--guidance_scale", "1.0", "--from_file", str(prompts), "--image_size", str(SIZE), str(SIZE),
        "--infer_steps", str(cfg.sample_steps), "--num_images", str(cfg.samples_per_prompt),
        "--save_path", str(out / "samples")])

    eps_score = score(out / "samples_eps", out / "samples_eps_grid.png")
    flow_score = score(out / "samples", out / "samples_grid.png")
    summary = {**flow_score, "goal": GOAL, "passed": flow_score["accuracy"] >= GOAL, "seconds": clock.total(),
               "stage_seconds": clock.seconds, "config": asdict(cfg), "family": "sdxl", "tokenizer": which,
               "vae_mse": built["vae_mse"], "vae_colours": built["vae_colours"], "model": str(flow_model),
               "loss_curve": str(flow / "loss.png"),
               "eps": {**eps_score, "model": str(eps_model), "loss_curve": str(eps / "loss.png")}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in clock.seconds.items() if v >= 0.5)
    text = (f"flowtuner demo --family sdxl: the eps model ({cfg.eps_steps} steps) drew the prompted colour in "
            f"{eps_score['correct']}/{eps_score['images']} samples ({eps_score['accuracy']:.0%}); converted to flow "
            f"({cfg.train_steps} steps) in {flow_score['correct']}/{flow_score['images']} ({flow_score['accuracy']:.0%}; "
            f"goal {GOAL:.0%}); {summary['seconds']} s in all ({stages}).\n"
            f"flow model (SDXL single file): {flow_model}\nsample grids: {summary['grid']} (flow), "
            f"{eps_score['grid']} (eps)\nloss curves: {summary['loss_curve']} (flow), {eps / 'loss.png'} (eps)\n")
    (out / "summary.txt").write_text(text)
    print("\n" + text)
    return summary


def score(samples: Path, grid: Path) -> dict:
    """How often the demo's colour classifier finds the prompted colour dominating a sample; the grid drawn."""
    from flowtuner.demo.runner import _grid, _prompted

    results = []
    for path in sorted(samples.glob("*.png")):
        color, shape = _prompted(json.loads(Image.open(path).text["flowtuner"])["prompt"], False)
        results.append((color, path, classify(Image.open(path)), shape))
    correct = sum(pred == color for color, _, pred, _ in results)
    _grid(results, grid)
    return {"images": len(results), "correct": correct, "accuracy": correct / max(1, len(results)), "grid": str(grid)}
