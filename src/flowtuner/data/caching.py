"""`cache-latents` and `cache-text`: compute exactly the missing or stale cache files, write each
atomically, and report. Edit models' control images go into the same caches (data/controls.py: which
ones, at which size). Only flowtuner's own, unchanged files are ever replaced or removed (their
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
from PIL import Image
from tqdm import tqdm

from flowtuner.data.buckets import BucketSelector, bucket_selector
from flowtuner.data.cache import (
    FRESH, MISSING, STALE, UNVERIFIED, check_cache, latent_cache_path, remove_quietly, save_latent_cache, save_text_cache,
    source_identity, text_cache_path, variant_name, weights_identity, written_by_flowtuner,
)
from flowtuner.data.config import Dataset
from flowtuner.data.controls import ControlPlan, control_pixels, control_rule, control_size, plan_controls
from flowtuner.data.images import ImageReadError, read_info, read_rgb
from flowtuner.data.sources import Item, collect_items
from flowtuner.errors import ConfigError
from flowtuner.families.base import Family, ModelPaths
from flowtuner.families.paths import require
from flowtuner.weights.reader import open_checkpoint

log = logging.getLogger(__name__)

CACHE_DTYPE = torch.bfloat16  # musubi-tuner's caches are bf16
CHECK_THREADS = max(1, min(8, (os.cpu_count() or 2) - 1))
# as stored (no EXIF rotation), cover + centre crop, Lanczos up / INTER_AREA down (musubi-tuner's pixels), mode
LATENT_RECIPE = "stored-cover-crop-lanczos-inter_area/mode/v2"
# the prompt recipe's seed for cache-text's variants: variant k of an item is drawn from (this, k, item key), so
# raising prompt_variants keeps the variants already cached and adds new ones
VARIANT_SEED = 0


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
    warnings: list[str] = field(default_factory=list)  # dataset-wide decisions (e.g. control images ignored)

    def lines(self) -> list[str]:
        out = [f"{self.kind} caches: {self.total} items: {self.cached} cached, {self.fresh} fresh (skipped), "
               f"{self.unverified} unverified (not flowtuner's, kept), {len(self.failed)} failed, {self.removed} removed"]
        out += [f"  warning: {w}" for w in self.warnings]
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
    controls: list[Path] = field(default_factory=list)  # the control images the model reads, in order
    control_sizes: list[tuple[int, int]] = field(default_factory=list)  # (W, H) each is cached at
    selector: object = None  # the dataset's bucket rule (data/buckets.py): how the image is placed in its bucket


def _sweep_temp_files(folder: Path) -> None:
    """Temporary files of a killed run (atomic writes never leave a partial file under a real name)."""
    for tmp in folder.glob(".*.safetensors.*.tmp"):
        remove_quietly(tmp)


def _triage(tasks: list[Task], summary: CacheSummary, skip_existing: bool, with_source: bool) -> list[Task]:
    """The tasks whose cache is missing, stale or unreadable; counts the rest. Checks run in threads: each
    hashes its file's content (hashlib releases the GIL), about 3 ms per 1024x1024 latent + text pair."""
    todo = []
    with ThreadPoolExecutor(CHECK_THREADS) as pool:
        statuses = list(pool.map(lambda t: check_cache(t.path, t.expected, t.item.image if with_source else None, t.controls),
                                 tasks))
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


class _Refused(Exception):
    """An item that cannot be cached: (the file to name, why)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(reason)
        self.path, self.reason = path, reason


def _controls_of(ds: Dataset, item: Item, plan: ControlPlan, bucket, step: int) -> tuple[list[Path], list[tuple[int, int]]]:
    """(control images, the (W, H) each is cached at) of an item; raises _Refused."""
    if item.key in plan.refused:
        raise _Refused(item.image, plan.refused[item.key])
    controls, sizes = plan.controls.get(item.key, []), []
    for control in controls:
        try:
            info = read_info(control)
        except ImageReadError as exc:
            raise _Refused(item.image, f"control image {control}: {exc.reason}") from None
        size = control_size(ds, bucket, (info.width, info.height), step)
        if min(size) < step:
            raise _Refused(item.image, f"control image {control} is {info.width}x{info.height}: under {step} px once "
                                       f"floored to multiples of {step} (no_resize_control); use a larger image")
        sizes.append(size)
    return controls, sizes


def _control_record(ds: Dataset, sizes: list[tuple[int, int]], family: Family) -> dict:
    """The provenance entries of the controls (none for a family that reads no control image, so the caches of
    text-to-image models keep their record)."""
    if family.max_controls == 0:
        return {}
    rule = {"control_rule": control_rule(ds)} if sizes else {}  # an item without controls does not depend on it
    return {**rule, "control_sizes": [list(s) for s in sizes]}


def _dataset_plan(ds: Dataset, items: list[Item], family: Family, summary: CacheSummary) -> ControlPlan:
    plan = plan_controls(items, family.max_controls)
    summary.warnings += [f"{ds.name}: {w}" for w in plan.warnings]
    return plan


def _latent_tasks(datasets, family, vae_id, summary, protected) -> list[Task]:
    tasks = []
    for ds in datasets:
        items, _ = collect_items(ds)
        plan = _dataset_plan(ds, items, family, summary)
        selector = bucket_selector(ds, family.size_step)
        for item in items:
            try:
                try:
                    info = read_info(item.image)
                except ImageReadError as exc:
                    raise _Refused(exc.path, exc.reason) from None
                bucket = selector.select(info.width, info.height)
                controls, sizes = _controls_of(ds, item, plan, bucket, family.size_step)
            except _Refused as exc:
                summary.failed.append((exc.path, exc.reason))
                protected[ds.cache_directory].add(item.key)
                continue
            path = latent_cache_path(ds.cache_directory, item.key, (info.width, info.height), family.cache_arch)
            expected = {"bucket": list(bucket), "model": vae_id, "recipe": LATENT_RECIPE, **selector.record(),
                        **_control_record(ds, sizes, family)}
            tasks.append(Task(ds, item, path, expected, bucket, (info.width, info.height), controls, sizes, selector))
    return tasks


@dataclass
class Loaded:
    target: np.ndarray
    controls: list[np.ndarray]
    crop: tuple[int, int] = (0, 0)  # (left, top) cropped off the resized image


def _load_controls(task: Task) -> list[np.ndarray]:
    """The task's control images as cached ([H, W, 3] uint8 each); raises _Refused naming the control."""
    out = []
    for control, size in zip(task.controls, task.control_sizes):
        try:
            out.append(control_pixels(control, size))
        except ImageReadError as exc:
            raise _Refused(task.item.image, f"control image {control}: {exc.reason}") from None
    return out


def _place(task: Task) -> tuple[np.ndarray, tuple[int, int]] | str:
    """(the target image as the VAE gets it ([H, W, 3] uint8), its crop (left, top)), or why it cannot be read."""
    try:
        return task.selector.place(read_rgb(task.item.image), task.bucket, task.item.key)
    except ImageReadError as exc:
        return exc.reason


def _load_for_bucket(task: Task) -> tuple[Task, np.ndarray | str]:
    """The target image as the VAE gets it ([H, W, 3] uint8), or why it cannot be read."""
    placed = _place(task)
    return task, placed if isinstance(placed, str) else placed[0]


def _load(task: Task) -> tuple[Task, Loaded | str]:
    """The target and its control images as the VAE gets them, or why one cannot be read."""
    target = _place(task)
    if isinstance(target, str):
        return task, target
    try:
        return task, Loaded(target[0], _load_controls(task), target[1])
    except _Refused as exc:
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
                    loaded = list(pool.map(_load, group[start : start + size]))
                    _encode_and_write(codec, loaded, family, summary)
                    bar.update(len(loaded))
        del codec
    keep = defaultdict(set)
    for task in tasks:
        keep[task.dataset.cache_directory].add(task.path)
    _remove_orphans(datasets, keep, protected, f"*_{family.cache_arch}.safetensors",
                    lambda p: p.name.rsplit("_", 2)[0], summary, keep_cache)
    return summary


def _encode_and_write(codec, loaded: list[tuple[Task, Loaded | str]], family: Family, summary: CacheSummary) -> None:
    good = []
    for task, result in loaded:
        if isinstance(result, str):
            summary.failed.append((task.item.image, result))
        else:
            good.append((task, result))
    if not good:
        return
    pixels = torch.from_numpy(np.stack([r.target for _, r in good])).permute(0, 3, 1, 2).float() / 255.0
    latents = codec.encode(pixels).to(torch.float32).cpu()
    for (task, result), latent in zip(good, latents):
        # each control on its own: controls of one batch may differ in size (musubi-tuner encodes them so too)
        controls = [_as_cached(codec.encode(_to_unit(c))[0]) for c in result.controls]
        provenance = {**task.expected, "source": source_identity(task.item.image)}
        if task.controls:
            provenance["control_sources"] = [source_identity(c) for c in task.controls]
        save_latent_cache(task.path, _as_cached(latent), family.architecture, task.size, provenance, controls,
                          _geometry(task, result) if task.selector.records_geometry else {})
        summary.cached += 1


def _geometry(task: Task, result: Loaded) -> dict[str, torch.Tensor]:
    """What the image was before its bucket (SDXL's micro-conditioning): original (height, width) and the crop's
    (top, left) in the resized image, height first as SDXL's time ids read them."""
    return {"original_size": torch.tensor([task.size[1], task.size[0]], dtype=torch.int64),
            "crop_top_left": torch.tensor([result.crop[1], result.crop[0]], dtype=torch.int64)}


def _to_unit(array: np.ndarray) -> torch.Tensor:
    """[H, W, 3] uint8 -> the codec's input [1, 3, H, W] in [0, 1]."""
    return torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255.0


def _as_cached(latent: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(latent.to(torch.float32).cpu()).to(CACHE_DTYPE)


def _text_tasks(datasets: list[Dataset], family: Family, te_id: str, summary: CacheSummary, protected) -> list[Task]:
    recipe, tasks = family.text_recipe(), []
    for ds in datasets:
        _sweep_temp_files(ds.cache_directory)
        items, _ = collect_items(ds)
        plan = _dataset_plan(ds, items, family, summary)
        selector = bucket_selector(ds, family.size_step)
        for item in items:
            try:
                if item.caption is None:
                    raise _Refused(item.image, "missing or empty caption")
                controls, sizes = _text_controls(ds, item, plan, selector, family.size_step)
            except _Refused as exc:
                summary.failed.append((exc.path, exc.reason))
                protected[ds.cache_directory].add(item.key)
                continue
            path = text_cache_path(ds.cache_directory, item.key, family.cache_arch)
            expected = {"caption": item.caption, "model": te_id, "recipe": recipe, **_control_record(ds, sizes, family),
                        **_variant_record(ds, item, family)}
            tasks.append(Task(ds, item, path, expected, controls=controls, control_sizes=sizes))
    return tasks


def _variant_record(ds: Dataset, item: Item, family: Family) -> dict:
    """What an item's prompt variants are drawn from (none with prompt_variants = 1: the plain cache's record)."""
    if ds.prompt_variants == 1:
        return {}
    if not family.prompt_recipe:
        raise ConfigError(f"{ds.name}: prompt_variants = {ds.prompt_variants}: the {family.name} model has no prompt "
                          "recipe to draw variants with; set prompt_variants = 1 (the caption as is).")
    return {"prompt_variants": {"count": ds.prompt_variants, "seed": VARIANT_SEED, "recipe": family.prompt_recipe,
                                "tags": item.tags, "score": item.score}}


def _encode_variants(encoder, task: Task, family: Family, summary: CacheSummary) -> None:
    """One item's K prompts from the family's recipe, in one cache file: variant k's tensors under
    variant_name(name, k); the prompts themselves go into the provenance, for reading back."""
    try:
        variants = family.prompt_variants(task.item, task.dataset.prompt_variants, VARIANT_SEED, encoder)
    except ConfigError as exc:  # e.g. an item without the recipe's columns: that item fails, the rest are cached
        summary.failed.append((task.item.image, str(exc)))
        return
    conds = encoder.encode(variants.prompts, **variants.encode_options)
    tensors = {variant_name(name, k): t for k, cond in enumerate(conds) for name, t in _cache_tensors(family, cond).items()}
    save_text_cache(task.path, tensors, family.architecture, task.item.caption,
                    {**task.expected, "prompts": variants.prompts})
    summary.cached += 1


def _cache_tensors(family: Family, cond) -> dict[str, torch.Tensor]:
    return {name: torch.nan_to_num(t.float()).to(CACHE_DTYPE) if t.is_floating_point() else t
            for name, t in family.text_cache_tensors(cond).items()}


def _text_controls(ds: Dataset, item: Item, plan: ControlPlan, selector: BucketSelector, step: int):
    """An item's controls for its text cache: the text encoder sees them as the latent cache holds them, so the
    target's bucket is needed (the default sizing rule) when there are any."""
    if not plan.controls.get(item.key) and item.key not in plan.refused:
        return [], []
    try:
        info = read_info(item.image)
    except ImageReadError as exc:
        raise _Refused(exc.path, exc.reason) from None
    return _controls_of(ds, item, plan, selector.select(info.width, info.height), step)


def _encode_text_chunk(encoder, chunk: list[Task], family: Family, summary: CacheSummary) -> None:
    ready, images = [], []
    for task in chunk:
        if task.dataset.prompt_variants > 1:
            _encode_variants(encoder, task, family, summary)
            continue
        try:
            images.append([Image.fromarray(a) for a in _load_controls(task)])
            ready.append(task)
        except _Refused as exc:
            summary.failed.append((exc.path, exc.reason))
    if not ready:
        return
    captions = [t.item.caption for t in ready]
    conds = encoder.encode(captions, images=images) if family.max_controls else encoder.encode(captions)
    for task, cond in zip(ready, conds):
        tensors = _cache_tensors(family, cond)
        provenance = dict(task.expected)
        if task.controls:
            provenance["control_sources"] = [source_identity(c) for c in task.controls]
        save_text_cache(task.path, tensors, family.architecture, task.item.caption, provenance)
        summary.cached += 1


def cache_text(datasets: list[Dataset], family: Family, paths: ModelPaths, device: torch.device,
               batch_size: int | None = None, skip_existing: bool = False, keep_cache: bool = False) -> CacheSummary:
    """Text-encoder caches; for a family that reads control images with the text (edit models), each caption is
    encoded with its item's controls, resized as the latent cache resizes them."""
    family.validate(paths, ("text_encoder",))
    te_id = weights_identity(open_checkpoint(require(paths, "text_encoder")))
    summary, protected = CacheSummary("text"), defaultdict(set)
    tasks = _text_tasks(datasets, family, te_id, summary, protected)
    summary.total = len(tasks) + len(summary.failed)
    todo = _triage(tasks, summary, skip_existing, with_source=False)
    if todo:
        encoder = family.load_text_encoder(paths, device)
        size = batch_size or max(t.dataset.batch_size for t in todo)
        with tqdm(total=len(todo), desc="caching text", unit="caption") as bar:
            for start in range(0, len(todo), size):
                chunk = todo[start : start + size]
                _encode_text_chunk(encoder, chunk, family, summary)
                bar.update(len(chunk))
        del encoder
    keep = defaultdict(set)
    for task in tasks:
        keep[task.dataset.cache_directory].add(task.path)
    suffix = f"_{family.cache_arch}_te.safetensors"
    _remove_orphans(datasets, keep, protected, f"*{suffix}", lambda p: p.name[: -len(suffix)], summary, keep_cache)
    return summary
