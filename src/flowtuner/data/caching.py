"""`cache-latents` and `cache-text`: compute exactly the missing or stale cache files, write each
atomically, and report. Only flowtuner's own, unchanged files are ever replaced or removed (their
content digest proves it); a cache another tool wrote is left alone and reported. Model-agnostic: the
family supplies the encoders and the naming."""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from flowtuner.data.buckets import BucketSelector, resize_to_bucket
from flowtuner.data.cache import (
    FRESH, MISSING, STALE, UNVERIFIED, check_cache, latent_cache_path, remove_quietly, save_latent_cache, save_text_cache,
    source_identity, text_cache_path, weights_identity, written_by_flowtuner,
)
from flowtuner.data.config import Dataset
from flowtuner.data.images import ImageReadError, read_info, read_rgb
from flowtuner.data.sources import Item, collect_items
from flowtuner.families.base import Family, ModelPaths
from flowtuner.families.paths import require
from flowtuner.weights.reader import open_checkpoint

log = logging.getLogger(__name__)

CACHE_DTYPE = torch.bfloat16  # musubi-tuner's caches are bf16
CHECK_THREADS = max(1, min(8, (os.cpu_count() or 2) - 1))
# as stored (no EXIF rotation), cover + centre crop, Lanczos up / INTER_AREA down (musubi-tuner's pixels), mode
LATENT_RECIPE = "stored-cover-crop-lanczos-inter_area/mode/v2"


@dataclass
class CacheSummary:
    kind: str
    total: int = 0
    cached: int = 0
    fresh: int = 0
    unverified: int = 0
    kept_stale: int = 0
    removed: int = 0
    stale_reasons: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    unverified_reasons: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    foreign_orphans: list[Path] = field(default_factory=list)  # not produced by the dataset, not flowtuner's: kept
    failed: list[tuple[Path, str]] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"{self.kind} caches: {self.total} items: {self.cached} cached, {self.fresh} fresh (skipped), "
               f"{self.unverified} unverified (not flowtuner's, kept), {len(self.failed)} failed, {self.removed} removed"]
        if self.kept_stale:
            out.append(f"  {self.kept_stale} stale caches kept because of --skip_existing")
        out += [f"  recomputed: {n} x {reason}" for reason, n in sorted(self.stale_reasons.items())]
        out += [f"  unverified: {n} x {reason}" for reason, n in sorted(self.unverified_reasons.items())]
        if self.foreign_orphans:
            out.append(f"  {len(self.foreign_orphans)} cache files the dataset no longer produces were left in place because "
                       f"flowtuner did not write them (e.g. {self.foreign_orphans[0]}); training reads every cache in the "
                       "folder: delete them if they are stale")
        out += [f"  failed: {path}: {reason}" for path, reason in self.failed]
        return out


@dataclass
class Task:
    dataset: Dataset
    item: Item
    path: Path
    expected: dict
    bucket: tuple[int, int] | None = None
    size: tuple[int, int] | None = None  # original image (W, H)


def _sweep_temp_files(folder: Path) -> None:
    """Temporary files of a killed run (atomic writes never leave a partial file under a real name)."""
    for tmp in folder.glob(".*.safetensors.*.tmp"):
        remove_quietly(tmp)


def _triage(tasks: list[Task], summary: CacheSummary, skip_existing: bool, with_source: bool) -> list[Task]:
    """The tasks whose cache is missing, stale or unreadable; counts the rest. Checks run in threads: each
    hashes its file's content (hashlib releases the GIL), about 3 ms per 1024x1024 latent + text pair."""
    todo = []
    with ThreadPoolExecutor(CHECK_THREADS) as pool:
        statuses = list(pool.map(lambda t: check_cache(t.path, t.expected, t.item.image if with_source else None), tasks))
    for task, status in zip(tasks, statuses):
        if status.state == FRESH:
            summary.fresh += 1
        elif status.state == UNVERIFIED:
            summary.unverified += 1
            summary.unverified_reasons[status.reason] += 1
        elif status.state == STALE and skip_existing:
            summary.kept_stale += 1
        else:
            if status.state != MISSING:
                summary.stale_reasons[status.reason] += 1
            todo.append(task)
    return todo


def _remove_orphans(datasets: list[Dataset], keep: dict[Path, set[Path]], protected: dict[Path, set[str]],
                    pattern: str, key_of, summary: CacheSummary, keep_cache: bool) -> None:
    """Cache files in a dataset's cache folder that the dataset no longer produces: removed when they are
    flowtuner's own output, otherwise left in place and reported."""
    if keep_cache:
        return
    for ds in datasets:
        folder = ds.cache_directory
        for path in sorted(folder.glob(pattern)):
            if path in keep[folder] or key_of(path) in protected[folder]:
                continue
            if written_by_flowtuner(path):
                remove_quietly(path)
                summary.removed += 1
            else:
                summary.foreign_orphans.append(path)


def _latent_tasks(datasets, family, vae_id, summary, protected) -> list[Task]:
    tasks = []
    for ds in datasets:
        items, _ = collect_items(ds)
        selector = BucketSelector(ds.resolution, ds.enable_bucket, ds.bucket_no_upscale, family.size_step)
        for item in items:
            try:
                info = read_info(item.image)
            except ImageReadError as exc:
                summary.failed.append((exc.path, exc.reason))
                protected[ds.cache_directory].add(item.key)
                continue
            bucket = selector.select(info.width, info.height)
            path = latent_cache_path(ds.cache_directory, item.key, (info.width, info.height), family.cache_arch)
            expected = {"bucket": list(bucket), "model": vae_id, "recipe": LATENT_RECIPE}
            tasks.append(Task(ds, item, path, expected, bucket, (info.width, info.height)))
    return tasks


def _load_for_bucket(task: Task) -> tuple[Task, np.ndarray | str]:
    try:
        return task, resize_to_bucket(read_rgb(task.item.image), task.bucket)
    except ImageReadError as exc:
        return task, exc.reason


def cache_latents(datasets: list[Dataset], family: Family, paths: ModelPaths, device: torch.device,
                  batch_size: int | None = None, num_workers: int = 2, skip_existing: bool = False,
                  keep_cache: bool = False) -> CacheSummary:
    family.validate(paths, ("vae",))
    vae_id = weights_identity(open_checkpoint(require(paths, "vae")))
    summary, protected = CacheSummary("latent"), defaultdict(set)
    for ds in datasets:
        _sweep_temp_files(ds.cache_directory)
    tasks = _latent_tasks(datasets, family, vae_id, summary, protected)
    summary.total = len(tasks) + len(summary.failed)
    todo = _triage(tasks, summary, skip_existing, with_source=True)
    if todo:
        codec = family.load_codec(paths, device)
        by_bucket: dict[tuple, list[Task]] = defaultdict(list)
        for task in todo:
            by_bucket[(task.bucket, task.dataset.index)].append(task)
        with ThreadPoolExecutor(max(1, num_workers)) as pool, tqdm(total=len(todo), desc="caching latents", unit="img") as bar:
            for group in by_bucket.values():
                size = batch_size or group[0].dataset.batch_size
                for start in range(0, len(group), size):
                    loaded = list(pool.map(_load_for_bucket, group[start : start + size]))
                    _encode_and_write(codec, loaded, family, summary)
                    bar.update(len(loaded))
        del codec
    keep = defaultdict(set)
    for task in tasks:
        keep[task.dataset.cache_directory].add(task.path)
    _remove_orphans(datasets, keep, protected, f"*_{family.cache_arch}.safetensors",
                    lambda p: p.name.rsplit("_", 2)[0], summary, keep_cache)
    return summary


def _encode_and_write(codec, loaded: list[tuple[Task, np.ndarray | str]], family: Family, summary: CacheSummary) -> None:
    good = []
    for task, result in loaded:
        if isinstance(result, str):
            summary.failed.append((task.item.image, result))
        else:
            good.append((task, result))
    if not good:
        return
    pixels = torch.from_numpy(np.stack([a for _, a in good])).permute(0, 3, 1, 2).float() / 255.0
    latents = codec.encode(pixels).to(torch.float32).cpu()
    for (task, _), latent in zip(good, latents):
        latent = torch.nan_to_num(latent).to(CACHE_DTYPE)
        save_latent_cache(task.path, latent, family.architecture, task.size,
                          {**task.expected, "source": source_identity(task.item.image)})
        summary.cached += 1


def cache_text(datasets: list[Dataset], family: Family, paths: ModelPaths, device: torch.device,
               batch_size: int | None = None, skip_existing: bool = False, keep_cache: bool = False) -> CacheSummary:
    family.validate(paths, ("text_encoder",))
    te_id = weights_identity(open_checkpoint(require(paths, "text_encoder")))
    recipe = family.text_recipe()
    summary, protected, tasks = CacheSummary("text"), defaultdict(set), []
    for ds in datasets:
        _sweep_temp_files(ds.cache_directory)
        items, problems = collect_items(ds)
        for item in items:
            if item.caption is None:
                summary.failed.append((item.image, "missing or empty caption"))
                protected[ds.cache_directory].add(item.key)
                continue
            path = text_cache_path(ds.cache_directory, item.key, family.cache_arch)
            tasks.append(Task(ds, item, path, {"caption": item.caption, "model": te_id, "recipe": recipe}))
    summary.total = len(tasks) + len(summary.failed)
    todo = _triage(tasks, summary, skip_existing, with_source=False)
    if todo:
        encoder = family.load_text_encoder(paths, device)
        size = batch_size or max(t.dataset.batch_size for t in todo)
        with tqdm(total=len(todo), desc="caching text", unit="caption") as bar:
            for start in range(0, len(todo), size):
                chunk = todo[start : start + size]
                for task, cond in zip(chunk, encoder.encode([t.item.caption for t in chunk])):
                    tensors = {name: torch.nan_to_num(t.float()).to(CACHE_DTYPE) if t.is_floating_point() else t
                               for name, t in family.text_cache_tensors(cond).items()}
                    save_text_cache(task.path, tensors, family.architecture, task.item.caption, task.expected)
                    summary.cached += 1
                bar.update(len(chunk))
        del encoder
    keep = defaultdict(set)
    for task in tasks:
        keep[task.dataset.cache_directory].add(task.path)
    suffix = f"_{family.cache_arch}_te.safetensors"
    _remove_orphans(datasets, keep, protected, f"*{suffix}", lambda p: p.name[: -len(suffix)], summary, keep_cache)
    return summary
