"""Block swap overhead: time of one LoRA training step (forward + backward + SGD) of a mid-size Qwen-Image DiT
with --blocks_to_swap 0, N/2 and N-1, on the CPU (or --device cuda, which also prints the peak device memory).
On the CPU the "device" is the host: the ratio is the cost of the schedule and of copying each streamed block
into its ring slot, not of a PCIe transfer.

    OMP_NUM_THREADS=1 python bench/block_swap.py [--device cpu] [--layers 8] [--heads 2] [--steps 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from diffusers import QwenImageTransformer2DModel  # noqa: E402

from flowtuner.train.lora import LoRANetwork  # noqa: E402
from flowtuner.weights.block_swap import install, resident_blocks  # noqa: E402


def build(layers: int, heads: int, seed: int = 0) -> QwenImageTransformer2DModel:
    """The real block structure at width heads x 128 (the real model: 24 heads, 60 layers)."""
    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=layers, attention_head_dim=128,
                                       num_attention_heads=heads, joint_attention_dim=128,
                                       axes_dims_rope=(16, 56, 56)).eval().requires_grad_(False)


def lora(model) -> LoRANetwork:
    paths = sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("transformer_blocks."))
    return LoRANetwork(model, paths, rank=4, alpha=4.0)


def batch(device, tokens: int = 256, text: int = 32, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    side = int(tokens ** 0.5)
    return dict(hidden_states=torch.randn(1, tokens, 64, generator=g).to(device),
                encoder_hidden_states=torch.randn(1, text, 128, generator=g).to(device),
                timestep=torch.tensor([0.5], device=device), img_shapes=[[(1, side, side)]], return_dict=False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def lora_steps(layers: int, heads: int, swapped: int, device: torch.device, steps: int, checkpointing: bool,
               tokens: int = 256) -> tuple[float, float | None, torch.Tensor]:
    """(seconds per step after a warm-up step, peak device GiB or None, the last step's loss)."""
    model = build(layers, heads)
    install(model, model.transformer_blocks, swapped, device)  # swapped 0: the whole model onto the device
    network = lora(model).to(device).attach()
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    opt = torch.optim.SGD(network.parameters(), lr=1e-3)
    inputs = batch(device, tokens)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps + 1):
        sync(device)
        t = time.perf_counter()
        loss = model(**inputs)[0].square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return sum(times[1:]) / steps, peak, loss.detach().cpu()


def run() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--gradient_checkpointing", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    n = args.layers
    block_mib = sum(p.numel() * p.element_size() for p in build(1, args.heads).transformer_blocks[0].parameters()) / 2**20
    print(f"DiT: {n} blocks of {block_mib:.1f} MiB (width {args.heads * 128}), {args.tokens} image tokens, LoRA rank 4, "
          f"{'with' if args.gradient_checkpointing else 'without'} gradient checkpointing, {device}; torch {torch.__version__}")
    base = None
    for swapped in (0, n // 2, n - 1):
        seconds, peak, loss = lora_steps(n, args.heads, swapped, device, args.steps, args.gradient_checkpointing, args.tokens)
        base = base if base is not None else (seconds, loss)
        line = (f"--blocks_to_swap {swapped:2d}: {seconds * 1000:8.1f} ms/step  x{seconds / base[0]:.2f}  "
                f"resident blocks {resident_blocks(n, swapped)}  loss equal: {torch.equal(loss, base[1])}")
        print(line + (f"  peak {peak:.3f} GiB" if peak is not None else ""))


if __name__ == "__main__":
    run()
