"""Training step time split into data, forward, backward, optimizer and everything else, on a tiny
Qwen-Image model over real cache files; plus, as the reference measured in the same run, a bare loop
(the same model, batches and optimizer, with no loader, accelerate, logging or bookkeeping).
Goal: "other" <= 3 % of the step.

    python bench/train_step.py [--steps 300] [--layers 2] [--batch_size 4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flowtuner.cli import main as cli  # noqa: E402
from flowtuner.config.train import TrainConfig  # noqa: E402
from flowtuner.families.qwen_image.tiny import tiny_dit, tiny_text_encoder, tiny_vae  # noqa: E402
from flowtuner.train.loop import Trainer  # noqa: E402
from tests.datasets import good_dataset  # noqa: E402
from tests.layouts import write_hf_repo  # noqa: E402


def bare_loop(trainer: Trainer, repo: Path, steps: int) -> float:
    """Seconds per step of the minimal loop: next batch from a list, loss, backward, AdamW."""
    from flowtuner.data.config import load_dataset_config
    from flowtuner.data.loader import BatchPlan, CacheDataset, scan_caches

    family = trainer.family
    denoiser = family.load_denoiser(family.resolve_paths(model=repo), torch.device("cpu"))
    network = trainer._network(denoiser)
    from flowtuner.train.loop import TrainModule

    module = TrainModule(denoiser, network)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    datasets = load_dataset_config(trainer.cfg.dataset_config)
    items = scan_caches(datasets, family)
    batches = [CacheDataset(items, family)[b] for b in BatchPlan(items, datasets, 0).epoch(0)]
    gen = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    for i in range(steps):
        loss, _ = trainer.loss(module, denoiser, batches[i % len(batches)], gen, torch.device("cpu"))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--tokenizer", default=str(Path(__file__).resolve().parents[2] / "shared/fixtures/tokenizers/qwen25"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        repo = write_hf_repo({"dit": tiny_dit(layers=args.layers), "vae": tiny_vae(), "te": tiny_text_encoder()},
                             Path(args.tokenizer), tmp / "repo")
        cfg_file = good_dataset(tmp, sizes=[(128, 128)] * 16)
        cfg_file.write_text(cfg_file.read_text().replace("batch_size = 2", f"batch_size = {args.batch_size}")
                            .replace("resolution = [64, 64]", "resolution = [128, 128]"))
        for kind in ("latents", "text"):
            cli([f"cache-{kind}", "--dataset_config", str(cfg_file), "--model", str(repo), "--device", "cpu"])
        cfg = TrainConfig(dataset_config=str(cfg_file), model=str(repo), device="cpu", output_dir=str(tmp / "out"),
                          max_train_steps=args.steps, seed=0, max_data_loader_n_workers=0)
        trainer = Trainer(cfg)
        trainer.run()
        timings = trainer.timings
        step = sum(timings.values())
        print("\nflowtuner training step, per phase:")
        for phase, seconds in timings.items():
            print(f"  {phase:>16}: {seconds * 1000:8.2f} ms  ({seconds / step:6.1%})")
        print(f"  {'total':>16}: {step * 1000:8.2f} ms")
        bare = bare_loop(Trainer(cfg), repo, args.steps)
        print(f"bare loop (reference): {bare * 1000:.2f} ms per step; flowtuner / bare = {step / bare:.3f}")


if __name__ == "__main__":
    main()
