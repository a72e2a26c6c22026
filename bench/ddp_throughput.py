"""Training throughput of a tiny Qwen-Image run on 2 processes (torchrun; gloo on the CPU) against 1 process.
LoRA: 2 DDP processes against 1 process, the reference, with the same global batch (1 process accumulates 2
micro-batches, 2 processes take one each). Full fine-tuning (`finetune`): FSDP2 (`--fsdp`, one unit per block)
against DDP, both on the same processes and global batch. OMP_NUM_THREADS=1 per process; samples/s come from
the trainer's own time per step (process start and model loading are not counted).

    OMP_NUM_THREADS=1 python bench/ddp_throughput.py [--steps 100] [--layers 2] [--batch_size 2] [--size 128]
    python bench/ddp_throughput.py --device cuda --processes 1 --layers 8 --size 512   # on GPUs (bf16)

On a 2-core machine the two processes share the cores with each other (and with anything else running):
the ratio is the DDP overhead plus whatever the second core adds, not a GPU figure. With CUDA, each process
takes one GPU (--processes: how many; 1 measures FSDP2's own overhead against DDP on one GPU).
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

import torch  # noqa: E402

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


def run(processes: int, accumulation: int, common: list[str], out: Path, command: str = "train", *extra: str) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           "-m", "flowtuner", command, *common, "--output_dir", str(out), "--gradient_accumulation_steps", str(accumulation),
           *extra]
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
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    ap.add_argument("--processes", type=int, default=None, help="processes of the multi-process runs (default: 2 on the "
                                                                 "CPU, every GPU with CUDA)")
    ap.add_argument("--skip_lora", action="store_true", help="only the finetune FSDP2 / DDP comparison")
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
        cuda = args.device == "cuda"
        procs = args.processes or (torch.cuda.device_count() if cuda else 2)
        # several CUDA processes: each takes cuda:LOCAL_RANK whatever --device says (docs/scale.md)
        common = ["--dataset_config", str(cfg_file), "--model", str(repo), "--device", args.device, "--seed", "0",
                  "--max_train_steps", str(args.steps), "--max_data_loader_n_workers", "0", "--no_plan",
                  *(("--mixed_precision", "bf16") if cuda else ())]
        where = f"{procs} x {torch.cuda.get_device_name(0)}" if cuda else f"{os.cpu_count()} CPUs"
        if not args.skip_lora:
            samples = 2 * args.batch_size  # per optimizer step, both runs
            one = samples / run(1, 2, common, tmp / "one")
            two = samples / run(2, 1, common, tmp / "two")
            print(f"\nLoRA training, {args.layers}-layer tiny DiT, {args.size}x{args.size}, global batch {samples} items, "
                  f"{args.steps} steps, {where}:")
            print(f"  reference: 1 process (accumulating 2)  {one:8.1f} samples/s  1.00")
            print(f"  2 DDP processes                        {two:8.1f} samples/s  {two / one:.2f}")
        samples = procs * args.batch_size
        ddp = run(procs, 1, common, tmp / "ddp", "finetune")
        fsdp = run(procs, 1, common, tmp / "fsdp", "finetune", "--fsdp")
        print(f"\nfull fine-tuning, {args.layers}-layer tiny DiT, {args.size}x{args.size}, global batch {samples} items, "
              f"{args.steps} steps, {procs} processes, {where}:")
        print(f"  DDP                {ddp * 1000:8.1f} ms/step  {samples / ddp:8.1f} samples/s  1.00")
        print(f"  FSDP2 (--fsdp)     {fsdp * 1000:8.1f} ms/step  {samples / fsdp:8.1f} samples/s  {ddp / fsdp:.2f}")


if __name__ == "__main__":
    main()
