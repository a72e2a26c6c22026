"""The issue-11 figures table: planned peak VRAM of a Qwen-Image (20B) LoRA at 1024², batch 1, bf16, gradient
checkpointing, rank 16, 256 text tokens, AdamW8bit (the optimizer of musubi-tuner's documented LoRA command), for
musubi-tuner's published rows, with the ratio to musubi's figure and
the issue's goal. Each row is `flowtuner plan train --model_version original ... --json` (no weights needed).

    OMP_NUM_THREADS=1 python bench/plan_table.py [--network_dim 16] [--optimizer_type adamw8bit] [--offload]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from flowtuner.cli import main  # noqa: E402

GIB, GB = 1024**3, 1e9
# option row -> (flags, musubi-tuner's published GB, the goal GB)
ROWS = {
    "none": ((), 42, 36),
    "fp8_scaled": (("--fp8_base", "--fp8_scaled"), 30, 24),
    "+ 16 swapped": (("--fp8_base", "--fp8_scaled", "--blocks_to_swap", "16"), 24, 20),
    "+ 45 swapped": (("--fp8_base", "--fp8_scaled", "--blocks_to_swap", "45"), 12, 10),
}


def plan(flags: tuple[str, ...], dim: int, extra: list[str]) -> dict:
    out = io.StringIO()
    argv = ["plan", "train", "--model_version", "original", "--mixed_precision", "bf16", "--gradient_checkpointing",
            "--network_dim", str(dim), "--json", *flags, *extra]
    with contextlib.redirect_stdout(out):
        if main(argv) != 0:
            raise SystemExit(f"plan failed: {' '.join(argv)}")
    return json.loads(out.getvalue())


def main_() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--network_dim", type=int, default=16)
    ap.add_argument("--optimizer_type", default="adamw8bit", help="adamw8bit (musubi-tuner's example), adamw, adafactor")
    ap.add_argument("--offload", action="store_true", help="every row with --gradient_checkpointing_cpu_offload too")
    args = ap.parse_args()
    args.extra = ["--optimizer_type", args.optimizer_type] + (["--gradient_checkpointing_cpu_offload"] if args.offload else [])
    print("| options | flowtuner planned device peak | components (GiB) | host peak | musubi-tuner | ratio | goal |")
    print("|---|---|---|---|---|---|---|")
    for name, (flags, musubi, goal) in ROWS.items():
        p = plan(flags, args.network_dim, args.extra)
        gb = p["device_peak_gib"] * GIB / GB
        parts = ", ".join(f"{k} {v:.2f}" for k, v in p["components"].items())
        host = p["host_peak_gib"]
        print(f"| {name} | {p['device_peak_gib']:.2f} GiB ({gb:.1f} GB) | {parts} | {host:.2f} GiB | {musubi} GB | "
              f"{gb / musubi:.2f} | {'met' if gb <= goal else 'not met'} (≤ {goal} GB) |")


if __name__ == "__main__":
    main_()
