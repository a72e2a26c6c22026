"""Measured peak device memory of one Qwen-Image LoRA training step at the real size (the published 20.4 B DiT
config, random weights) next to what `flowtuner plan train` predicts for the same settings. Needs a CUDA device
with room for the bf16 model (~41 GB) and host RAM for the swapped rows; on a CPU, `--layers 2 --width 128`
checks that the script runs.

    python bench/real_size_vram.py [--device cuda] [--layers 60] [--size 1024] [--rank 16]
        [--configs none,fp8_scaled,swap16,swap45,offload]

Each row: the trainer's step as `flowtuner train` runs it (the family's denoiser and LoRA targets, LoRA rank R
in float32 under bf16 autocast, AdamW, gradient checkpointing, 256 text tokens, batch 1), its peak allocated
device memory (torch.cuda.max_memory_allocated, weights included) and the plan's device peak: the ratio
measured / planned. The model is built on the device (meta, then random values), quantised there for the fp8
rows, moved to the host and installed as `--blocks_to_swap` does for the swap rows.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from diffusers import QwenImageTransformer2DModel  # noqa: E402

from flowtuner.cli import main  # noqa: E402
from flowtuner.families.base import Conditioning  # noqa: E402
from flowtuner.families.qwen_image.dit import FP8_DEFAULT, FP8_POLICIES  # noqa: E402
from flowtuner.families.qwen_image.family import QwenImageDenoiser, QwenImageFamily  # noqa: E402
from flowtuner.families.qwen_image.plan import PUBLISHED_DIT  # noqa: E402
from flowtuner.train.lora import LoRANetwork  # noqa: E402
from flowtuner.train.offload import enable_checkpointing  # noqa: E402
from flowtuner.weights.block_swap import install  # noqa: E402
from flowtuner.weights.fp8 import SCALED_DEFAULT, quantise_module  # noqa: E402
from flowtuner.weights.materialize import build_empty  # noqa: E402

GIB = 2**30
STEPS_TIMED = 2
# row name -> (fp8_scaled, blocks_to_swap, activation offload)
CONFIGS = {"none": (False, 0, False), "fp8_scaled": (True, 0, False), "swap16": (True, 16, False),
           "swap45": (True, 45, False), "offload": (True, 0, True)}


def build(config: dict, device: torch.device, fp8: bool) -> QwenImageTransformer2DModel:
    model = build_empty(lambda: QwenImageTransformer2DModel.from_config(config))  # RoPE tables stay real
    g = torch.Generator(device).manual_seed(0)
    for module in model.modules():
        for key, p in module._parameters.items():
            if p is not None:  # bf16 values drawn on the device: no float32 copy of 20 B weights anywhere
                value = torch.empty(p.shape, dtype=torch.bfloat16, device=device).normal_(0, 0.02, generator=g)
                module._parameters[key] = torch.nn.Parameter(value, requires_grad=False)
    model = model.to(device).eval()
    if fp8:
        quantise_module(model, FP8_POLICIES[FP8_DEFAULT], SCALED_DEFAULT)
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step(config: dict, name: str, device: torch.device, size: int, rank: int, text: int) -> tuple[float, float]:
    """(peak device GiB from the second LoRA step on (the first allocates AdamW's state), seconds per step of the
    steps after the second)."""
    fp8, swap, offload = CONFIGS[name]
    model = build(config, device, fp8)
    if swap:  # as loaded for --blocks_to_swap: the model on the host, then all but the streamed blocks moved over
        model.to("cpu")
        torch.cuda.empty_cache() if device.type == "cuda" else None
    install(model, model.transformer_blocks, swap, device)
    family = QwenImageFamily()
    network = LoRANetwork(model, family.lora_default_targets(model), rank, float(rank)).to(device).attach()
    enable_checkpointing(model, model.transformer_blocks, device, offload)
    model.train()
    denoiser = QwenImageDenoiser(model)
    geometry = denoiser.geometry(size, size)
    opt = torch.optim.AdamW(network.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, geometry.image_tokens, 64, generator=g).to(device)
    cond = Conditioning(torch.randn(1, text, config["joint_attention_dim"], generator=g).to(device))
    autocast = torch.autocast(device.type, torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    seconds = []
    for i in range(2 + STEPS_TIMED):
        if i == 1 and device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        t = time.perf_counter()
        with autocast:
            loss = (denoiser.predict(x, torch.tensor([0.5]), cond, geometry) - x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        seconds.append(time.perf_counter() - t)
    step_s = sum(seconds[2:]) / STEPS_TIMED
    if device.type != "cuda":
        return float("nan"), step_s
    return torch.cuda.max_memory_allocated() / GIB, step_s


def peak_breakdown(top: int = 14) -> None:
    """What is alive at the largest allocated total of the recorded history, grouped by the innermost frame in
    flowtuner / diffusers / torch.nn code (where it was allocated)."""
    trace = torch.cuda.memory._snapshot()["device_traces"][0]
    live, total, best, best_at = {}, 0, -1, 0
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            live[e["addr"]] = e
            total += e["size"]
        elif e["action"] == "free_requested" and e["addr"] in live:
            total -= live.pop(e["addr"])["size"]
        if total > best:
            best, best_at = total, i
    live = {}
    for e in trace[: best_at + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif e["action"] == "free_requested":
            live.pop(e["addr"], None)
    groups: dict[str, list[int]] = {}
    for e in live.values():
        frames = e.get("frames") or []
        frame = next((f for f in frames if any(k in f["filename"] for k in ("flowtuner", "diffusers", "torch/nn", "bench"))),
                     frames[0] if frames else {"filename": "?", "line": 0, "name": "?"})
        key = f"{frame['filename'].split('site-packages/')[-1].split('.devrepo/')[-1]}:{frame['line']} {frame['name']}"
        g = groups.setdefault(key, [0, 0])
        g[0] += e["size"]
        g[1] += 1
    print(f"  peak of the recorded history: {best / GIB:.2f} GiB (events {best_at}/{len(trace)})", flush=True)
    for key, (size, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"  {size / GIB:8.3f} GiB {count:6d}x  {key}", flush=True)


def planned(name: str, layers: int, size: int, rank: int, text: int) -> float:
    fp8, swap, offload = CONFIGS[name]
    argv = ["plan", "train", "--model_version", "original", "--mixed_precision", "bf16", "--gradient_checkpointing",
            "--network_dim", str(rank), "--network_alpha", str(rank), "--resolution", str(size), str(size),
            "--text_tokens", str(text), "--json"]
    argv += ["--fp8_scaled"] if fp8 else []
    argv += ["--blocks_to_swap", str(swap)] if swap else []
    argv += ["--gradient_checkpointing_cpu_offload"] if offload else []
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        if main(argv) != 0:
            raise SystemExit(f"plan failed: {' '.join(argv)}")
    return json.loads(out.getvalue())["device_peak_gib"]


def run() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=60)
    ap.add_argument("--width", type=int, default=3072, help="inner width (heads x 128); 3072 is the real one")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--text_tokens", type=int, default=256)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--snapshot", action="store_true", help="CUDA: print what is alive at the peak, by allocation site")
    args = ap.parse_args()
    device = torch.device(args.device)
    config = {**PUBLISHED_DIT, "num_layers": args.layers, "num_attention_heads": args.width // 128}
    real = args.layers == PUBLISHED_DIT["num_layers"] and args.width == 3072
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else device}; torch {torch.__version__}; "
          f"{args.layers} blocks, width {args.width}, {args.size}², LoRA rank {args.rank}, bf16, checkpointing", flush=True)
    print(f"{'row':12} {'measured GiB':>13} {'planned GiB':>12} {'measured/planned':>17} {'s/step':>7} {'row s':>6}", flush=True)
    for name in args.configs.split(","):
        t = time.perf_counter()
        if args.snapshot:
            torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
        measured, step_s = step(config, name, device, args.size, args.rank, args.text_tokens)
        if args.snapshot:
            peak_breakdown()
            torch.cuda.memory._record_memory_history(enabled=None)
        plan = planned(name, args.layers, args.size, args.rank, args.text_tokens) if real else float("nan")
        print(f"{name:12} {measured:13.2f} {plan:12.2f} {measured / plan:17.3f} {step_s:7.2f} {time.perf_counter() - t:6.1f}",
              flush=True)
        gc.collect()  # the swap hooks hold the last model in reference cycles
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    run()
