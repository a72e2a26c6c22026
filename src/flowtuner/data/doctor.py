"""`flowtuner dataset check`: everything wrong with a dataset, found before any model is loaded."""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

from flowtuner.data.buckets import bucket_selector, resize_to_bucket, upscale_factor
from flowtuner.data.config import Dataset
from flowtuner.data.controls import ControlPlan, control_size, decode_control, plan_controls
from flowtuner.data.images import ORIENTATIONS, ImageReadError, decode, read_rgb
from flowtuner.data.sources import Item, Problem, collect_items

UPSCALE_WARNING = 1.5  # an image enlarged more than this to fill its bucket is reported
THUMB = 160
SHEET_COLUMNS, SHEET_ROWS = 8, 6


@dataclass
class DatasetReport:
    dataset: Dataset
    items: list[Item]
    problems: list[Problem]
    buckets: Counter = field(default_factory=Counter)
    readable: list[tuple[Item, tuple[int, int]]] = field(default_factory=list)  # (item, bucket)
    latent_bytes: int = 0
    text_bytes: int = 0

    @property
    def errors(self) -> int:
        return sum(p.severity == "error" for p in self.problems)


@dataclass
class _Inspected:
    item: Item
    size: tuple[int, int] | None = None
    digest: str | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)  # warnings about how the image is read
    controls: list[tuple[Path, tuple[int, int] | None, str | None, list[str]]] = field(default_factory=list)
    # per control image the model reads: (path, size, error, notes)


def _orientation_note(orientation: int) -> list[str]:
    if orientation == 1:
        return []
    return [f"EXIF orientation {orientation}: viewers show it {ORIENTATIONS[orientation]}, but it is trained as stored "
            "(musubi-tuner's behaviour, kept so both tools make the same cache); save it upright to train it as shown"]


def _inspect(item: Item, controls: list[Path]) -> _Inspected:
    """The image fully decoded: its size, content hash, and how flowtuner's reading of it is special; the same
    for each of its control images the model reads."""
    checked = [_inspect_control(c) for c in controls]
    try:
        decoded = decode(item.image)
    except ImageReadError as exc:
        return _Inspected(item, error=exc.reason, controls=checked)
    notes = _orientation_note(decoded.orientation)
    notes += [f"{d}, so the two tools' caches of this image differ" for d in decoded.differences]
    return _Inspected(item, decoded.image.size, hashlib.sha256(item.image.read_bytes()).hexdigest(), notes=notes,
                      controls=checked)


def _inspect_control(path: Path) -> tuple[Path, tuple[int, int] | None, str | None, list[str]]:
    try:
        decoded = decode_control(path)
    except ImageReadError as exc:
        return path, None, exc.reason, []
    return path, decoded.image.size, None, decoded.notes


def _control_problems(found: _Inspected, plan: ControlPlan) -> list[Problem]:
    """Control images are named through their target: the item is what fails to cache."""
    item, out = found.item, []
    if item.key in plan.refused:
        out.append(Problem("error", item.image, plan.refused[item.key]))
    for path, _, error, notes in found.controls:
        if error:
            out.append(Problem("error", item.image, f"control image {path}: {error}"))
        out += [Problem("warning", item.image, f"control image {path}: {note}") for note in notes]
    return out


def check_dataset(ds: Dataset, size_step: int, estimate_cache, num_workers: int = 2, max_controls: int = 0) -> DatasetReport:
    """`max_controls`: control images the model reads per item (the family's); 0 = it reads none, and a
    dataset's controls are reported as ignored."""
    items, problems = collect_items(ds)
    report = DatasetReport(ds, items, problems)
    plan = plan_controls(items, max_controls)
    where = ds.control_directory or ds.image_jsonl_file or ds.image_directory
    problems += [Problem("warning", where, w) for w in plan.warnings]
    selector = bucket_selector(ds, size_step)
    seen: dict[str, Path] = {}
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        work = pool.map(lambda it: _inspect(it, [c for c in plan.controls.get(it.key, []) if c.exists()]), items)
        results = list(tqdm(work, total=len(items), desc=f"checking {ds.name}", unit="img", disable=len(items) < 50))
    for found in results:
        problems += _control_problems(found, plan)
        item, size, digest = found.item, found.size, found.digest
        if found.error:
            problems.append(Problem("error", item.image, found.error))
            continue
        problems += [Problem("warning", item.image, note) for note in found.notes]
        bucket = selector.select(*size)
        report.readable.append((item, bucket))
        report.buckets[bucket] += ds.num_repeats
        factor = upscale_factor(size[0], size[1], bucket)
        if factor > UPSCALE_WARNING:
            problems.append(Problem("warning", item.image, f"{size[0]}x{size[1]} is enlarged {factor:.1f}x to fill bucket {bucket[0]}x{bucket[1]}"))
        if digest in seen:
            problems.append(Problem("warning", item.image, f"same content as {seen[digest]}"))
        seen.setdefault(digest, item.image)
        latent, text = estimate_cache(bucket, item.caption or "")
        report.latent_bytes += latent + sum(estimate_cache(control_size(ds, bucket, c_size, size_step), "")[0]
                                            for _, c_size, _, _ in found.controls if c_size)
        report.text_bytes += text
    return report


def _label(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str) -> None:
    draw.rectangle((xy[0], xy[1], xy[0] + 7 * len(text) + 4, xy[1] + 12), fill=(0, 0, 0))
    draw.text((xy[0] + 2, xy[1]), text, fill=(255, 255, 255))


def write_previews(report: DatasetReport, folder: Path) -> list[Path]:
    """Contact sheets of what the model will see: each image resized and cropped to its bucket."""
    folder.mkdir(parents=True, exist_ok=True)
    per_sheet = SHEET_COLUMNS * SHEET_ROWS
    written = []
    for n, start in enumerate(range(0, len(report.readable), per_sheet)):
        chunk = report.readable[start : start + per_sheet]
        rows = (len(chunk) + SHEET_COLUMNS - 1) // SHEET_COLUMNS
        sheet = Image.new("RGB", (SHEET_COLUMNS * (THUMB + 4), rows * (THUMB + 4)), (40, 40, 40))
        draw = ImageDraw.Draw(sheet)
        for i, (item, bucket) in enumerate(chunk):
            crop = Image.fromarray(resize_to_bucket(read_rgb(item.image), bucket))
            scale = THUMB / max(crop.size)  # small crops are enlarged (pixelated) so they stay visible
            crop = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))),
                               Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)
            x, y = (i % SHEET_COLUMNS) * (THUMB + 4) + 2, (i // SHEET_COLUMNS) * (THUMB + 4) + 2
            sheet.paste(crop, (x + (THUMB - crop.width) // 2, y + (THUMB - crop.height) // 2))
            _label(draw, (x, y), f"{bucket[0]}x{bucket[1]} {item.key[:12]}")
        path = folder / f"dataset{report.dataset.index}_{n:03d}.png"
        sheet.save(path)
        written.append(path)
    return written


def bucket_histogram(buckets: Counter, width: int = 40) -> list[str]:
    if not buckets:
        return ["  (no readable images)"]
    top = max(buckets.values())
    return [f"  {w:>5}x{h:<5} {n:>6}  {'#' * max(1, round(width * n / top))}" for (w, h), n in sorted(buckets.items())]


def format_report(report: DatasetReport) -> list[str]:
    ds = report.dataset
    by_severity = defaultdict(int)
    for p in report.problems:
        by_severity[p.severity] += 1
    lines = [
        f"{ds.name}: {len(report.items)} items, {len(report.readable)} readable, x{ds.num_repeats} repeats, "
        f"resolution {ds.resolution[0]}x{ds.resolution[1]}, buckets {'on' if ds.enable_bucket else 'off'}",
        "  bucket histogram (W x H, items per epoch):",
        *["  " + line for line in bucket_histogram(report.buckets)],
        f"  estimated cache size: latents {report.latent_bytes / 2**20:.1f} MiB, text {report.text_bytes / 2**20:.1f} MiB "
        f"in {ds.cache_directory}",
        f"  problems: {by_severity['error']} errors, {by_severity['warning']} warnings",
    ]
    lines += [f"    {p}" for p in report.problems]
    return lines
