"""Peak RSS while loading a bf16 DiT checkpoint, relative to the file size.

Writes a synthetic checkpoint with the real Qwen-Image key names and widths (fewer blocks, about
1 GB), then loads it in fresh processes with (a) flowtuner's loader and (b) the common reference way
(`safetensors.torch.load_file` + `load_state_dict` into a model built normally), and prints
(peak RSS - RSS before loading) / file bytes for each, and their ratio.

    python bench/load_memory.py [--layers 1] [--dir /tmp/ft-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

REAL = dict(patch_size=2, in_channels=64, out_channels=16, attention_head_dim=128, num_attention_heads=24,
            joint_attention_dim=3584, axes_dims_rope=(16, 56, 56))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_checkpoint(path: Path, layers: int) -> None:
    import torch
    from accelerate import init_empty_weights
    from diffusers import QwenImageTransformer2DModel
    from safetensors.torch import save_file

    with init_empty_weights():
        model = QwenImageTransformer2DModel(num_layers=layers, **REAL)
    gen = torch.Generator().manual_seed(0)
    tensors = {k: (torch.randn(v.shape, generator=gen) * 0.02).to(torch.bfloat16) for k, v in model.state_dict().items()}
    save_file(tensors, str(path))


def child(mode: str, path: str, layers: int) -> None:
    import torch  # noqa: F401  (imports are part of the baseline, not of loading)
    from diffusers import QwenImageTransformer2DModel
    from safetensors.torch import load_file

    from flowtuner.families.qwen_image.dit import load_dit

    before = rss_bytes()
    if mode == "flowtuner":
        model, _ = load_dit(path)
    else:
        model = QwenImageTransformer2DModel(num_layers=layers, **REAL).to(torch.bfloat16)
        model.load_state_dict(load_file(path))
    print(json.dumps({"before": before, "peak": peak_bytes(), "params": sum(p.numel() for p in model.parameters())}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--dir", default="/tmp/flowtuner-bench")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.layers)
    path = Path(args.dir) / f"dit_{args.layers}layers_bf16.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        make_checkpoint(path, args.layers)
    size = path.stat().st_size
    print(f"checkpoint: {path} ({size / 2**30:.2f} GiB)")
    ratios = {}
    for mode in ("flowtuner", "reference"):
        out = subprocess.run([sys.executable, __file__, "--layers", str(args.layers), "--child", mode, str(path)],
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        ratios[mode] = (r["peak"] - r["before"]) / size
        print(f"{mode:>10}: peak RSS - baseline = {(r['peak'] - r['before']) / 2**30:.2f} GiB -> {ratios[mode]:.2f}x file size")
    print(f"flowtuner / reference peak ratio: {ratios['flowtuner'] / ratios['reference']:.2f}")


if __name__ == "__main__":
    main()
