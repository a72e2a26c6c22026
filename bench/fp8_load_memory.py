"""Peak host RAM while loading a bf16 DiT file as `--fp8_scaled` (issue 11 goal: <= 0.55x the file's bytes).

Writes a synthetic bf16 Qwen-Image DiT with the real key names and real width (3072; `--blocks` real blocks,
default 4: ~2.8 GB) one tensor at a time, then loads it in a child process with flowtuner's loader
(families/qwen_image/dit.py load_dit, scaled=True) and reports the child's peak RSS (getrusage ru_maxrss) over
the file's bytes: as measured, and less the RSS the child had before loading (Python, torch and diffusers
imported: a fixed cost, not the load's).

    OMP_NUM_THREADS=1 python bench/fp8_load_memory.py [--blocks 4] [--keep FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

CHILD = r"""
import json, resource, sys
import torch
from flowtuner.families.qwen_image.dit import load_dit

def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))

torch.set_num_threads(1)
before = rss()
model, _ = load_dit(sys.argv[1], scaled=True)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
print(json.dumps({"before": before, "peak": peak, "model": held}))
"""


def dit_shapes(blocks: int) -> dict[str, tuple[int, ...]]:
    from diffusers import QwenImageTransformer2DModel

    sys.path.insert(0, str(Path(__file__).parents[1] / "src"))
    from flowtuner.families.qwen_image.plan import PUBLISHED_DIT

    with torch.device("meta"):
        model = QwenImageTransformer2DModel.from_config({**PUBLISHED_DIT, "num_layers": blocks})
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def write_bf16_file(path: Path, shapes: dict[str, tuple[int, ...]]) -> int:
    """A safetensors file written tensor by tensor (never the whole model in RAM); returns its size."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        n = 2 * int(torch.Size(shape).numel())
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    g = torch.Generator().manual_seed(0)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for key, shape in shapes.items():
            t = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
            f.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    os.replace(tmp, path)
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--keep", type=Path, help="write the file here and keep it (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or Path(tmp) / "dit_bf16.safetensors"
        size = write_bf16_file(path, dit_shapes(args.blocks))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, env=env, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
    gb = 1e9
    print(f"file {size / gb:.2f} GB ({args.blocks} real-width blocks, bf16); child RSS before loading {r['before'] / gb:.2f} GB, "
          f"peak {r['peak'] / gb:.2f} GB; the loaded model holds {r['model'] / gb:.2f} GB")
    print(f"peak RSS / file bytes: {r['peak'] / size:.3f}x")
    print(f"(peak RSS - RSS before loading) / file bytes: {(r['peak'] - r['before']) / size:.3f}x (goal <= 0.55x)")


if __name__ == "__main__":
    main()
