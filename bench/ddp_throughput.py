"""Training throughput of a tiny Qwen-Image LoRA run on 2 DDP processes (torchrun, gloo on the CPU) against
1 process, the reference, measured in the same run with the same global batch (1 process accumulates 2
micro-batches, 2 processes take one each) and OMP_NUM_THREADS=1 per process. samples/s come from the
trainer's own time per step (process start and model loading are not counted).

    OMP_NUM_THREADS=1 python bench/ddp_throughput.py [--steps 100] [--layers 2] [--batch_size 2] [--size 128]

On a 2-core machine the two processes share the cores with each other (and with anything else running):
the ratio is the DDP overhead plus whatever the second core adds, not a GPU figure.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flowtuner.cli import main as cli  # noqa: E402
from flowtuner.families.qwen_image.tiny import tiny_dit, tiny_text_encoder, tiny_vae  # noqa: E402
from tests.datasets import good_dataset  # noqa: E402
from tests.layouts import write_hf_repo  # noqa: E402


def seconds_per_step(log: str) -> float:
    """The sum of the phases of rank 0's 'time per step: data 1.0 ms, forward ...' line."""
    line = re.search(r"time per step: (.*)", log)
    if line is None:
        raise SystemExit("no 'time per step' line in the run's output:\n" + log[-3000:])
    return sum(float(ms) for ms in re.findall(r"([\d.]+) ms", line.group(1))) / 1000


def run(processes: int, accumulation: int, common: list[str], out: Path) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           "-m", "flowtuner", "train", *common, "--output_dir", str(out), "--gradient_accumulation_steps", str(accumulation)]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=3600)
    if done.returncode:  # the launcher's output is mostly both ranks' tracebacks: keep the log lines and errors
        log = (done.stdout + done.stderr).splitlines()
        raise SystemExit("\n".join(line for line in log if re.match(r"(\[rank0\]: )?(INFO|WARNING|\w*Error)", line)))
    return seconds_per_step(done.stdout + done.stderr)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch_size", type=int, default=2, help="items per micro-batch (per process)")
    ap.add_argument("--size", type=int, default=128, help="image side in pixels")
    ap.add_argument("--tokenizer", default=str(Path(__file__).resolve().parents[2] / "shared/fixtures/tokenizers/qwen25"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        repo = write_hf_repo({"dit": tiny_dit(layers=args.layers), "vae": tiny_vae(), "te": tiny_text_encoder()},
                             Path(args.tokenizer), tmp / "repo")
        cfg_file = good_dataset(tmp, sizes=[(args.size, args.size)] * 16)
        cfg_file.write_text(cfg_file.read_text().replace("batch_size = 2", f"batch_size = {args.batch_size}")
                            .replace("resolution = [64, 64]", f"resolution = [{args.size}, {args.size}]"))
        for kind in ("latents", "text"):
            cli([f"cache-{kind}", "--dataset_config", str(cfg_file), "--model", str(repo), "--device", "cpu"])
        common = ["--dataset_config", str(cfg_file), "--model", str(repo), "--device", "cpu", "--seed", "0",
                  "--max_train_steps", str(args.steps), "--max_data_loader_n_workers", "0"]
        samples = 2 * args.batch_size  # per optimizer step, both runs
        one = samples / run(1, 2, common, tmp / "one")
        two = samples / run(2, 1, common, tmp / "two")
    print(f"\nLoRA training, {args.layers}-layer tiny DiT, {args.size}x{args.size}, global batch {samples} items, "
          f"{args.steps} steps, {os.cpu_count()} CPUs:")
    print(f"  reference: 1 process (accumulating 2)  {one:8.1f} samples/s  1.00")
    print(f"  2 DDP processes (gloo)                 {two:8.1f} samples/s  {two / one:.2f}")


if __name__ == "__main__":
    main()
