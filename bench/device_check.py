"""The same tiny model and settings through `flowtuner generate` on the CPU and on an accelerator: every
sampling path (samplers, guidance, PAG, img2img, inpainting, DifferentialDiffusion, presets) must run
there and give the CPU's latents up to float rounding; then --blocks_to_swap (generate, and a LoRA step's time
and peak memory with 0 / half / all-but-one blocks swapped). Run by hand on a GPU machine:

    python bench/device_check.py [--device cuda] [--tokenizer DIR]

Prints, per case, the largest latent difference and its ratio to the latents' spread.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.layouts

from safetensors.torch import load_file  # noqa: E402

from flowtuner.cli import main  # noqa: E402
from flowtuner.families.qwen_image.tiny import tiny_dit, tiny_text_encoder, tiny_vae  # noqa: E402
from tests.layouts import write_hf_repo  # noqa: E402


def cases(folder: Path) -> dict[str, list[str]]:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(folder / "image.png")
    Image.fromarray(np.tile(np.linspace(0, 255, 128).astype(np.uint8), (128, 1))).save(folder / "mask.png")
    image = ["--image", str(folder / "image.png")]
    mask = [*image, "--mask", str(folder / "mask.png")]
    return {
        "default (reference path)": [],
        "cfg 1": ["--guidance_scale", "1"],
        "heun + apg + cfg_norm": ["--sampler", "heun", "--guidance", "apg:eta=0.5", "--guidance", "cfg_norm"],
        "pag blocks 0-1": ["--guidance", "pag:scale=3,blocks=0-1"],
        "dpmpp_2m_sde": ["--sampler", "dpmpp_2m_sde"],
        "euler_ancestral + karras": ["--sampler", "euler_ancestral", "--scheduler", "karras"],
        "fresca + tcfg + rescale_cfg": ["--guidance", "fresca", "--guidance", "tcfg", "--guidance", "rescale_cfg"],
        "preset comfy-qwen": ["--preset", "comfy-qwen"],
        "preset lightning": ["--preset", "lightning"],
        "img2img 0.6": [*image, "--strength", "0.6"],
        "inpaint": [*mask, "--strength", "1"],
        "differential_diffusion": [*mask, "--strength", "1", "--guidance", "differential_diffusion"],
    }


def generate(repo: Path, out: Path, device: str, extra: list[str]) -> torch.Tensor:
    rc = main(["generate", "--model", str(repo), "--prompt", "a red circle on a blue background", "--image_size", "128", "128",
               "--infer_steps", "12", "--seed", "3", "--device", device, "--save_path", str(out), "--output_type", "latent", *extra])
    if rc != 0:
        raise SystemExit(f"generate on {device} failed with {extra}")
    return load_file(next(out.glob("*.safetensors")))["latent"]


def components(device: str, tokenizer: str) -> None:
    """The pieces the sampling cases above do not reach: padded text batches through the text encoder and
    the DiT with a text mask (training batches), and one training loss + gradient."""
    from transformers import Qwen2Tokenizer

    from flowtuner.families.qwen_image.family import QwenImageDenoiser, collate
    from flowtuner.families.qwen_image.text_encoder import QwenTextEncoder

    te = tiny_text_encoder()
    prompts = ["a red circle", "a green square on a white background with a long tail of words", "blue"]
    embeds = {}
    for dev in ("cpu", device):
        encoder = QwenTextEncoder(te.model.language_model.to(dev), Qwen2Tokenizer.from_pretrained(tokenizer))
        embeds[dev] = encoder.encode(prompts)
    worst = max((a.embeds - b.embeds.cpu()).abs().max().item() for a, b in zip(embeds["cpu"], embeds[device]))
    print(f"{'text encoder, padded batch of 3':32} {worst:16.2e}")
    cond = collate(embeds["cpu"])
    dit = tiny_dit(layers=4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 64, 64, generator=g)
    outs, grads = {}, {}
    for dev in ("cpu", device):
        denoiser = QwenImageDenoiser(dit.to(dev).requires_grad_(True))
        geometry = denoiser.geometry(128, 128)
        v = denoiser.predict(x.to(dev), torch.tensor([0.3, 0.6, 0.9]), cond, geometry)
        loss = (v ** 2).mean()
        dit.zero_grad()
        loss.backward()
        outs[dev] = v.detach().cpu()
        grads[dev] = torch.cat([p.grad.flatten().cpu() for p in dit.parameters() if p.grad is not None])
    print(f"{'DiT, text mask, batch 3':32} {(outs['cpu'] - outs[device]).abs().max().item():16.2e}"
          f" {((outs['cpu'] - outs[device]).abs().max() / outs['cpu'].std()).item():10.2e}")
    print(f"{'DiT gradient':32} {(grads['cpu'] - grads[device]).abs().max().item():16.2e}"
          f" {((grads['cpu'] - grads[device]).abs().max() / grads['cpu'].abs().max()).item():10.2e}")


def block_swap(repo: Path, tmp: Path, device: str) -> None:
    """--blocks_to_swap on the accelerator: generated latents must equal the unswapped run's; a LoRA step of a
    12-block, 1024-wide DiT with S = 0 / 6 / 11: step time, peak device memory, loss equal (bench/block_swap.py)."""
    if not device.startswith("cuda"):
        print("block swap: skipped (the peak-memory figures need a CUDA device)")
        return
    from bench.block_swap import lora_steps

    latents, peaks = {}, {}
    for swapped in (0, 3):
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        latents[swapped] = generate(repo, tmp / f"swap{swapped}", device, ["--blocks_to_swap", str(swapped)])
        peaks[swapped] = (torch.cuda.max_memory_allocated() / 2**20, time.perf_counter() - t)
    print(f"{'generate --blocks_to_swap 3':32} {(latents[0] - latents[3]).abs().max().item():16.2e}   "
          f"peak {peaks[3][0]:.1f} MiB vs {peaks[0][0]:.1f} MiB, {peaks[3][1]:.2f} s vs {peaks[0][1]:.2f} s")
    dev = torch.device(device)
    for checkpointing in (False, True):
        base = None
        for swapped in (0, 6, 11):
            seconds, peak, loss = lora_steps(12, 8, swapped, dev, 3, checkpointing, tokens=1024)
            base = base or (seconds, loss)
            print(f"LoRA step, ckpt {checkpointing!s:5}, --blocks_to_swap {swapped:2d}: {seconds * 1000:7.1f} ms "
                  f"x{seconds / base[0]:.2f}  peak {peak:.3f} GiB  loss equal: {torch.equal(loss, base[1])}")


def run() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tokenizer", default=str(Path(__file__).resolve().parents[2] / "shared/fixtures/tokenizers/qwen25"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    repo = write_hf_repo({"dit": tiny_dit(layers=4), "vae": tiny_vae(), "te": tiny_text_encoder()}, Path(args.tokenizer), tmp / "repo")
    print(f"device: {torch.cuda.get_device_name() if args.device.startswith('cuda') else args.device}; torch {torch.__version__}")
    print(f"{'case':32} {'max |cpu - dev|':>16} {'/ std':>10} {'s (dev)':>8}")
    worst = 0.0
    for i, (name, extra) in enumerate(cases(tmp).items()):
        cpu = generate(repo, tmp / f"cpu{i}", "cpu", extra)
        t = time.perf_counter()
        dev = generate(repo, tmp / f"dev{i}", args.device, extra)
        seconds = time.perf_counter() - t
        diff = (cpu - dev).abs().max().item()
        rel = diff / cpu.std().item()
        worst = max(worst, rel)
        print(f"{name:32} {diff:16.2e} {rel:10.2e} {seconds:8.2f}")
    print(f"worst relative difference: {worst:.2e}")
    components(args.device, args.tokenizer)
    block_swap(repo, tmp, args.device)


if __name__ == "__main__":
    run()
