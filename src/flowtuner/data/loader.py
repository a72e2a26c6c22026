"""The training data: batches over cache files, every batch from one bucket of one dataset.

Order is a pure function of (seed, epoch), so a run restarted at (epoch, batch) sees exactly the
batches an uninterrupted run would have seen, whatever the number of worker processes.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset as TorchDataset, Sampler

from flowtuner.data.buckets import BucketSelector
from flowtuner.data.cache import text_cache_path
from flowtuner.data.config import Dataset
from flowtuner.errors import FlowtunerError
from flowtuner.families.base import Family
from flowtuner.weights.reader import open_checkpoint

LATENT_NAME = re.compile(r"^(?P<key>.+)_(?P<w>\d+)x(?P<h>\d+)_(?P<arch>[a-z0-9]+)\.safetensors$")


class CacheError(FlowtunerError):
    """Caches that do not match the dataset config."""


@dataclass(frozen=True)
class CachedItem:
    key: str
    latent: Path
    text: Path
    bucket: tuple[int, int]  # (W, H) in pixels
    dataset: int


def _single_key(path: Path, prefix: str) -> str:
    keys = [k for k in open_checkpoint(path).keys() if k.startswith(prefix)]
    if len(keys) != 1:
        raise CacheError(f"{path}: expected one {prefix}* tensor, found {len(keys)}; re-run the caching command.")
    return keys[0]


def scan_caches(datasets: list[Dataset], family: Family) -> list[CachedItem]:
    """Every (latent, text) cache pair of the datasets, checked against the current bucket config."""
    items, missing_text = [], []
    for ds in datasets:
        selector = BucketSelector(ds.resolution, ds.enable_bucket, ds.bucket_no_upscale, family.size_step)
        for latent in sorted(ds.cache_directory.glob(f"*_{family.cache_arch}.safetensors")):
            m = LATENT_NAME.match(latent.name)
            if not m:
                continue
            text = text_cache_path(ds.cache_directory, m["key"], family.cache_arch)
            if not text.exists():
                missing_text.append(text)
                continue
            bucket = selector.select(int(m["w"]), int(m["h"]))
            shape = open_checkpoint(latent).shape(_single_key(latent, "latents_"))
            h, w = shape[-2] * family.latent_scale, shape[-1] * family.latent_scale
            if (w, h) != bucket:
                raise CacheError(
                    f"{latent}: cached at {w}x{h}, but the dataset config now puts this image in bucket "
                    f"{bucket[0]}x{bucket[1]}; re-run cache-latents (it recomputes stale caches)."
                )
            items.append(CachedItem(m["key"], latent, text, bucket, ds.index))
    if missing_text:
        raise CacheError(f"{len(missing_text)} latent caches have no text cache (e.g. {missing_text[0]}); run cache-text.")
    if not items:
        raise CacheError("no caches found in the datasets' cache directories; run cache-latents and cache-text first.")
    return items


class BatchPlan:
    """Which items form which batch, per epoch: shuffled within (dataset, bucket), then batch order shuffled."""

    def __init__(self, items: list[CachedItem], datasets: list[Dataset], seed: int):
        self.seed = seed
        by_index = {ds.index: ds for ds in datasets}
        self.groups: dict[tuple, list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            self.groups[(item.dataset, item.bucket)].extend([i] * by_index[item.dataset].num_repeats)
        self.batch_sizes = {ds.index: ds.batch_size for ds in datasets}

    def epoch(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for (dataset, _), members in sorted(self.groups.items()):
            order = rng.permutation(members).tolist()
            size = self.batch_sizes[dataset]
            batches += [order[i : i + size] for i in range(0, len(order), size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def __len__(self) -> int:
        return sum(-(-len(m) // self.batch_sizes[d]) for (d, _), m in self.groups.items())


class PlanSampler(Sampler):
    """The batches of one epoch, from batch `start` on."""

    def __init__(self, plan: BatchPlan, epoch: int, start: int = 0):
        self.plan, self.epoch, self.start = plan, epoch, start

    def __iter__(self):
        return iter(self.plan.epoch(self.epoch)[self.start :])

    def __len__(self) -> int:
        return len(self.plan) - self.start


def _read(path: Path, prefix: str) -> torch.Tensor:
    ckpt = open_checkpoint(path)
    return ckpt.read(next(k for k in ckpt.keys() if k.startswith(prefix)))


class CacheDataset(TorchDataset):
    """dataset[list of item indices] -> one batch: latents [B, C, F, h, w], text embeds [B, L, D] zero-padded
    with mask [B, L] (1 = valid token), and the item keys."""

    def __init__(self, items: list[CachedItem]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, batch: list[int]) -> dict:
        chosen = [self.items[i] for i in batch]
        latents = torch.stack([_read(it.latent, "latents_") for it in chosen])
        embeds = [_read(it.text, "varlen_") for it in chosen]
        width = max(e.shape[0] for e in embeds)
        padded = torch.zeros(len(embeds), width, embeds[0].shape[1], dtype=embeds[0].dtype)
        mask = torch.zeros(len(embeds), width, dtype=torch.long)
        for i, e in enumerate(embeds):
            padded[i, : e.shape[0]] = e
            mask[i, : e.shape[0]] = 1
        return {"latents": latents, "embeds": padded, "mask": mask, "keys": [it.key for it in chosen]}


def make_loader(dataset: CacheDataset, plan: BatchPlan, epoch: int, start: int = 0, num_workers: int = 0) -> DataLoader:
    return DataLoader(dataset, sampler=PlanSampler(plan, epoch, start), batch_size=None, num_workers=num_workers,
                      persistent_workers=False, prefetch_factor=4 if num_workers else None)
