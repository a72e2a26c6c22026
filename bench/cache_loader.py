"""Samples/s delivered by the training loader over 1024x1024 caches (latents + text embeddings).

Writes N synthetic cache pairs in musubi-tuner's format (latents [16, 1, 128, 128] bf16, text
[L, 3584] bf16), then times flowtuner's loader (per worker count) and, as the reference measured in
the same run, plain `safetensors.torch.load_file` of the same files in a loop. Goal: >= 1000 samples/s.

    python bench/cache_loader.py [--items 256] [--epochs 3] [--batch_size 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from flowtuner.data.config import load_dataset_config
from flowtuner.data.loader import BatchPlan, CacheDataset, make_loader, scan_caches
from flowtuner.families.qwen_image import QwenImageFamily


def write_caches(root: Path, n: int, batch_size: int) -> Path:
    cache = root / "cache"
    cache.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    for i in range(n):
        latent = torch.randn(16, 1, 128, 128, generator=gen).to(torch.bfloat16)
        text = torch.randn(150 + i % 100, 3584, generator=gen).to(torch.bfloat16)
        save_file({"latents_1x128x128_bfloat16": latent}, cache / f"item{i:05d}_1024x1024_qi.safetensors",
                  {"architecture": "qwen_image", "width": "1024", "height": "1024", "format_version": "1.0.1"})
        save_file({"varlen_vl_embed_bfloat16": text}, cache / f"item{i:05d}_qi_te.safetensors",
                  {"architecture": "qwen_image", "caption1": f"caption {i}", "format_version": "1.0.1"})
    (root / "images").mkdir()
    cfg = root / "dataset.toml"
    cfg.write_text(f'[general]\nresolution = 1024\nbatch_size = {batch_size}\n[[datasets]]\n'
                   f'image_directory = "{root / "images"}"\ncache_directory = "{cache}"\n')
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch_size", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = write_caches(Path(tmp), args.items, args.batch_size)
        datasets = load_dataset_config(cfg)
        family = QwenImageFamily()
        items = scan_caches(datasets, family)
        plan, data = BatchPlan(items, datasets, seed=0), CacheDataset(items, family)
        list(make_loader(data, plan, 0))  # warm the page cache, as a training run's second epoch would be
        t = time.perf_counter()
        for _ in range(args.epochs):
            for it in items:  # cloned: the tensors must be in memory, not just mapped, as the loader's are
                [t.clone() for f in (it.latent, it.text) for t in load_file(str(f)).values()]
        ref = args.epochs * len(items) / (time.perf_counter() - t)
        print(f"reference (safetensors.load_file loop): {ref:8.0f} samples/s")
        for workers, processes in ((0, False), (1, False), (2, False), (4, False), (2, True)):
            t = time.perf_counter()
            n = sum(len(b["keys"]) for epoch in range(args.epochs)
                    for b in make_loader(data, plan, epoch, num_workers=workers, processes=processes))
            rate = n / (time.perf_counter() - t)
            kind = "processes" if processes else "threads"
            print(f"flowtuner loader, {workers} {kind}, batch {args.batch_size}: {rate:8.0f} samples/s  (x{rate / ref:.2f} reference)")


if __name__ == "__main__":
    main()
