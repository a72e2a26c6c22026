"""The training data: batches over cache files, every batch from one bucket of one dataset, and for edit
models one count and one set of shapes of control latents (musubi-tuner's grouping: a batch stacks).

Order is a pure function of (seed, epoch), so a run restarted at (epoch, batch) sees exactly the
batches an uninterrupted run would have seen, whatever the number of worker processes.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset as TorchDataset, Sampler

from flowtuner.data.buckets import bucket_selector
from flowtuner.data.cache import CONTROL_PREFIX, split_variant, tensor_name, text_cache_path
from flowtuner.data.config import Dataset
from flowtuner.data.distributed import Shard
from flowtuner.errors import FlowtunerError
from flowtuner.families.base import Family
from flowtuner.weights.reader import open_checkpoint

log = logging.getLogger(__name__)
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
    controls: tuple[str, ...] = ()  # control latents' names with shapes (latents_control_0_1x8x8, ...), sorted
    group: tuple[tuple[int, ...], ...] = ()  # shapes of the family's batch_group_tensors in the text cache
    stream: str | None = None  # the shards URL it is read from (data/streaming.py); None: the local cache files
    row: int = -1  # its row in those shards


def scan_caches(datasets: list[Dataset], family: Family) -> list[CachedItem]:
    """Every (latent, text) cache pair of the datasets, checked against the current bucket config."""
    items, missing_text = [], []
    for ds in datasets:
        if getattr(ds, "shards", None):
            from flowtuner.data.streaming import scan_shards

            items += scan_shards(ds, family)
            continue
        selector = bucket_selector(ds, family.size_step)
        seen: dict[str, Path] = {}
        for latent in sorted(ds.cache_directory.glob(f"*_{family.cache_arch}.safetensors")):
            m = LATENT_NAME.match(latent.name)
            if not m:
                continue
            if m["key"] in seen:  # one image cached at two original sizes: one file is stale (musubi-tuner trains both)
                raise CacheError(f"{seen[m['key']]} and {latent.name} are latent caches of the same item '{m['key']}'; "
                                 "delete the stale one (or re-run cache-latents, which removes its own stale files).")
            seen[m["key"]] = latent
            text = text_cache_path(ds.cache_directory, m["key"], family.cache_arch)
            if not text.exists():
                missing_text.append(text)
                continue
            bucket = selector.select(int(m["w"]), int(m["h"]))
            ckpt, key = _only(latent, "latents_")
            controls = tuple(sorted(tensor_name(k) for k in ckpt.keys() if k.startswith(CONTROL_PREFIX)))
            shape = ckpt.shape(key)
            h, w = shape[-2] * family.latent_scale, shape[-1] * family.latent_scale
            if (w, h) != bucket:
                raise CacheError(
                    f"{latent}: cached at {w}x{h}, but the dataset config now puts this image in bucket "
                    f"{bucket[0]}x{bucket[1]}; re-run cache-latents (it recomputes stale caches)."
                )
            items.append(CachedItem(m["key"], latent, text, bucket, ds.index, controls, _group(text, family)))
    if missing_text:  # cache-text reported why (e.g. a missing caption); train on the rest
        log.warning("%d latent caches have no text cache and are left out (e.g. %s); run cache-text.",
                    len(missing_text), missing_text[0])
    if not items:
        raise CacheError("no caches found in the datasets' cache directories; run cache-latents and cache-text first.")
    return items


def _group(text: Path, family: Family) -> tuple[tuple[int, ...], ...]:
    """The shapes of the text cache's tensors that a batch must agree on (the family's batch_group_tensors; the
    header alone is read)."""
    if not family.batch_group_tensors:
        return ()
    ckpt = open_checkpoint(text)
    shapes = {tensor_name(k): tuple(ckpt.shape(k)) for k in ckpt.keys()}
    missing = [n for n in family.batch_group_tensors if n not in shapes]
    if missing:
        raise CacheError(f"{text}: no {missing[0]}_* tensor; it was cached for another model: re-run cache-text.")
    for name, shape in shapes.items():  # any prompt variant may be the one trained: all must share the group
        k, base = split_variant(name)
        if k and base in family.batch_group_tensors and shape != shapes[base]:
            raise CacheError(f"{text}: prompt variant {k}'s {base} is {list(shape)}, variant 0's {list(shapes[base])}; "
                             "they must match (one batch group per item): re-run cache-text.")
    return tuple(shapes[n] for n in family.batch_group_tensors)


class BatchPlan:
    """Which items form which batch, per epoch: shuffled within (dataset, bucket, text-cache shapes the family
    groups by, control latents), then batch order shuffled. Items without either group by (dataset, bucket)
    alone, so a text-to-image plan is what it was before edit models and grouping families (the same groups in
    the same order: resumed runs see the same batches)."""

    def __init__(self, items: list[CachedItem], datasets: list[Dataset], seed: int):
        self.seed = seed
        by_index = {ds.index: ds for ds in datasets}
        self.groups: dict[tuple, list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            self.groups[(item.dataset, item.bucket, *item.group, *item.controls)].extend([i] * by_index[item.dataset].num_repeats)
        self.batch_sizes = {ds.index: ds.batch_size for ds in datasets}

    def epoch(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for key, members in sorted(self.groups.items()):
            order = rng.permutation(members).tolist()
            size = self.batch_sizes[key[0]]
            batches += [PlannedBatch(order[i : i + size], self.seed, epoch) for i in range(0, len(order), size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def __len__(self) -> int:
        return sum(-(-len(m) // self.batch_sizes[key[0]]) for key, m in self.groups.items())


class PlannedBatch(list):
    """A batch's item indices, with the (seed, epoch) it was planned for: what picks each item's prompt variant."""

    def __init__(self, indices, seed: int = 0, epoch: int = 0):
        super().__init__(indices)
        self.seed, self.epoch = seed, epoch


def variant_choice(seed: int, epoch: int, key: str, count: int) -> int:
    """Which of an item's `count` prompt variants epoch `epoch` of a run seeded `seed` trains: a pure function of
    the four (the same in a resumed run, with any number of workers or processes), uniform over the variants."""
    if count == 1:
        return 0
    digest = hashlib.sha256(f"variant|{seed}|{epoch}|{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % count


def _variant_keys(keys: list[str], seed: int, epoch: int, key: str) -> tuple[int, dict[str, str]]:
    """(the chosen variant, {cache key: the key's name for the family}) of a text cache's keys."""
    by_variant: dict[int, dict[str, str]] = defaultdict(dict)
    for k in keys:
        variant, base = split_variant(k)
        by_variant[variant][k] = base
    chosen = variant_choice(seed, epoch, key, max(by_variant) + 1 if by_variant else 1)
    return chosen, by_variant.get(chosen, {})


class PlanSampler(Sampler):
    """The batches of one epoch from global batch `start` on that this process trains (all of them in a
    single process; data/distributed.py deals them to several)."""

    def __init__(self, plan: BatchPlan, epoch: int, start: int = 0, shard: Shard = Shard()):
        self.plan, self.epoch, self.start, self.shard = plan, epoch, start, shard

    def __iter__(self):
        batches = self.plan.epoch(self.epoch)
        return iter([batches[i] for i in self.shard.deal(len(batches), self.start)])

    def __len__(self) -> int:
        return len(self.shard.deal(len(self.plan), self.start))


def _only(path: Path, prefix: str):
    return _only_in(open_checkpoint(path), prefix)


def _only_in(ckpt, prefix: str):
    keys = [k for k in ckpt.keys() if k.startswith(prefix) and not k.startswith(CONTROL_PREFIX)]
    if len(keys) != 1:
        raise CacheError(f"{ckpt.path}: expected one {prefix}* tensor, found {len(keys)}; re-run the caching command.")
    return ckpt, keys[0]


def _named(ckpt, keys, path: Path, required: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The tensors under `keys` by name without the dtype suffix; a required name missing is a cache error."""
    tensors = {tensor_name(k): ckpt.read(k) for k in keys}
    missing = [n for n in required if n not in tensors]
    if missing:
        raise CacheError(f"{path}: no {missing[0]}_* tensor (found: {', '.join(sorted(tensors)) or 'none'}); "
                         "it was cached for another model or by another tool: re-run the caching command.")
    return tensors


def _named_variant(tensors: dict[str, torch.Tensor], path: Path, variant: int, required: tuple[str, ...]) -> dict:
    """A text cache's tensors of one prompt variant by name without the dtype suffix; a missing name is a cache error."""
    out = {tensor_name(k): t for k, t in tensors.items()}
    missing = [n for n in required if n not in out]
    if missing:
        where = f" of prompt variant {variant}" if variant else ""
        raise CacheError(f"{path}: no {missing[0]}_* tensor{where} (found: {', '.join(sorted(out)) or 'none'}); "
                         "it was cached for another model or by another tool: re-run the caching command.")
    return out


class CacheDataset(TorchDataset):
    """dataset[list of item indices] -> one batch: latents [B, C, F, h, w] (read straight into the batch), the
    family's Conditioning made from the items' text caches (and the latent caches' other tensors), and the
    item keys."""

    def __init__(self, items: list[CachedItem], family: Family):
        self.items, self.family = items, family

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, batch: list[int]) -> dict:
        chosen = [self.items[i] for i in batch]
        files = _open_caches(chosen)
        lat = [_only_in(latent, "latents_") for latent, _ in files]
        shape, dtype = lat[0][0].shape(lat[0][1]), lat[0][0].dtype(lat[0][1])
        latents = torch.empty((len(chosen), *shape), dtype=dtype)
        extras = []
        for i, (ckpt, key) in enumerate(lat):
            if ckpt.shape(key) != shape:
                raise CacheError(f"{ckpt.path}: latent shape {list(ckpt.shape(key))} differs from {list(shape)} in the same bucket.")
            ckpt.read(key, out=latents[i])
            extras.append(_named(ckpt, [k for k in ckpt.keys() if k != key], ckpt.path))
        text = []
        seed, epoch = getattr(batch, "seed", 0), getattr(batch, "epoch", 0)  # a plain list: variant of (0, 0)
        for it, (_, ckpt) in zip(chosen, files):
            variant, keys = _variant_keys(list(ckpt.keys()), seed, epoch, it.key)
            named = {base: ckpt.read(k) for k, base in keys.items()}
            text.append(_named_variant(named, it.text, variant, self.family.text_cache_names))
        cond = self.family.cached_conditioning(text, extras)
        return {"latents": latents, "cond": cond, "keys": [it.key for it in chosen]}


def _open_caches(items: list[CachedItem]) -> list[tuple]:
    """(latent, text) cache of each item: the local files, or the rows of its shards (one read per shards URL)."""
    out = [None if it.stream else (open_checkpoint(it.latent), open_checkpoint(it.text)) for it in items]
    streams: dict[str, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        if it.stream:
            streams[it.stream].append(i)
    if streams:
        from flowtuner.data.streaming import fetch

        for url, where in streams.items():
            for i, pair in zip(where, fetch(url, [items[i].row for i in where])):
                out[i] = pair
    return out


class ThreadedLoader:
    """Batches in plan order, read ahead by a pool of threads. Reading cache files is I/O that releases
    the GIL, so threads overlap it without the cost of passing tensors between processes (measured in
    bench/cache_loader.py: process workers deliver 4-5x fewer samples/s on 2 cores)."""

    def __init__(self, dataset: CacheDataset, sampler: PlanSampler, num_workers: int, prefetch: int = 4):
        self.dataset, self.sampler = dataset, sampler
        self.num_workers, self.prefetch = num_workers, prefetch

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        batches = iter(self.sampler)
        with ThreadPoolExecutor(self.num_workers) as pool:
            pending = deque(pool.submit(self.dataset.__getitem__, b) for b in _take(batches, self.num_workers * self.prefetch))
            while pending:
                result = pending.popleft().result()
                pending.extend(pool.submit(self.dataset.__getitem__, b) for b in _take(batches, 1))
                yield result


def _take(iterator, n: int) -> list:
    out = []
    for _ in range(n):
        try:
            out.append(next(iterator))
        except StopIteration:
            break
    return out


def make_loader(dataset: CacheDataset, plan: BatchPlan, epoch: int, start: int = 0, num_workers: int = 0,
                processes: bool = False, shard: Shard = Shard()):
    """An iterable of the batches of `epoch` from global batch `start` on that `shard` trains. `num_workers`
    reader threads (0: read in the caller), or with `processes=True` a torch DataLoader with worker processes."""
    sampler = PlanSampler(plan, epoch, start, shard)
    if processes and num_workers:
        return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=num_workers, prefetch_factor=4)
    if any(it.stream for it in dataset.items):  # shards: fetch the coming batches' data files ahead
        from flowtuner.data.streaming import Prefetching

        sampler = Prefetching(sampler, dataset.items)
    if num_workers:
        return ThreadedLoader(dataset, sampler, num_workers)
    return (dataset[b] for b in sampler)
