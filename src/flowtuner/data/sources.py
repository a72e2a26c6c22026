"""Dataset items: (image, caption, control images) from an image folder with caption files, or from
a JSONL file. Problems are collected, never silently skipped: a missing or empty caption, a bad JSONL
line, control images without a target."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from flowtuner.data.config import Dataset
from flowtuner.data.images import IMAGE_EXTENSIONS, is_image_name
from flowtuner.errors import ConfigError


@dataclass
class Item:
    key: str  # the image stem: names the cache files
    image: Path
    caption: str | None
    controls: list[Path] = field(default_factory=list)
    # optional JSONL columns a prompt recipe reads (families/sdxl/prompts.py): comma-separated tags, a 0..10 score
    tags: str | None = None
    score: int | None = None


@dataclass
class Problem:
    severity: str  # "error" stops caching/training of the item; "warning" is reported only
    path: Path
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.path}: {self.message}"


def _images_in(folder: Path) -> list[Path]:
    """The images musubi-tuner's glob finds: its extension list, its case rule, no dot files."""
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_name(p))


def _skipped_images(folder: Path) -> list[Problem]:
    """Files PIL could read that musubi-tuner's extension list leaves out (.gif, .tif, .Png, ...): a warning
    each, so a dataset does not shrink unnoticed."""
    known = Image.registered_extensions()
    return [Problem("warning", p, f"skipped: '{p.suffix}' is not one of musubi-tuner's image extensions "
                                  f"({' '.join(IMAGE_EXTENSIONS)})")
            for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.startswith(".") and not is_image_name(p) and p.suffix.lower() in known]


def _control_order(stem: str, path: Path) -> int | None:
    """musubi-tuner's order: `<stem>.*` first, then `<stem>_<N>.*` by N; None: not a control of `stem`."""
    rest = path.stem[len(stem):]
    if rest == "":
        return 0
    return int(rest[1:]) + 1 if re.fullmatch(r"_\d+", rest) else None


def _match_controls(items: list[Item], candidates: list[Path]) -> None:
    """Each item's controls, matched as musubi-tuner matches them: longer target names first, and a control
    file goes to the first target it matches only (so `a_1.png` is the target a_1's, not a second control of
    a). A `<stem>_<text>.*` file with a non-numeric suffix matches nothing (musubi-tuner stops with an error)."""
    pool = set(candidates)
    for item in sorted(items, key=lambda it: len(it.image.name), reverse=True):
        mine = [(order, p) for p in pool if p.stem.startswith(item.key)
                and (order := _control_order(item.key, p)) is not None]
        pool.difference_update(p for _, p in mine)
        item.controls = [p for _, p in sorted(mine, key=lambda op: (op[0], op[1].name))]


def _from_directory(ds: Dataset, problems: list[Problem]) -> list[Item]:
    items = []
    problems += _skipped_images(ds.image_directory)
    for image in _images_in(ds.image_directory):
        caption_file = image.with_name(image.stem + ds.caption_extension)
        caption = None
        if not caption_file.exists():
            problems.append(Problem("error", image, f"no caption file ({caption_file.name})"))
        else:
            caption = caption_file.read_text(encoding="utf-8", errors="replace").strip()
            if not caption:
                problems.append(Problem("error", caption_file, "empty caption"))
                caption = None
        items.append(Item(image.stem, image, caption))
    return items


def _jsonl_path(value: str, jsonl: Path) -> Path:
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return jsonl.parent / path


def _from_jsonl(ds: Dataset, problems: list[Problem]) -> list[Item]:
    items = []
    for number, line in enumerate(ds.image_jsonl_file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            image = _jsonl_path(entry["image_path"], ds.image_jsonl_file)
        except (json.JSONDecodeError, TypeError, KeyError) as exc:
            reason = "not valid JSON" if isinstance(exc, json.JSONDecodeError) else "no 'image_path'"
            raise ConfigError(f"{ds.image_jsonl_file}:{number}: {reason}.") from None
        caption = entry.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            problems.append(Problem("error", image, f"missing or empty caption ({ds.image_jsonl_file.name}:{number})"))
            caption = None
        control_keys = sorted((k for k in entry if re.fullmatch(r"control_path(_\d+)?", k)),
                              key=lambda k: (k != "control_path", int(k.rsplit("_", 1)[1]) if k[-1].isdigit() else 0))
        controls = [_jsonl_path(entry[k], ds.image_jsonl_file) for k in control_keys]
        where = f"{ds.image_jsonl_file.name}:{number}"
        items.append(Item(image.stem, image, caption.strip() if caption else None, controls,
                          _tags(entry, image, where, problems), _score(entry, image, where, problems)))
    return items


def _tags(entry: dict, image: Path, where: str, problems: list[Problem]) -> str | None:
    """'tags': a comma-separated string or a list of strings; None when the column is absent."""
    tags = entry.get("tags")
    if tags is None or isinstance(tags, str):
        return tags.strip() if tags else tags
    if isinstance(tags, list) and all(isinstance(t, str) for t in tags):
        return ", ".join(t.strip() for t in tags if t.strip())
    problems.append(Problem("error", image, f"'tags' must be a comma-separated string or a list of strings ({where})"))
    return None


def _score(entry: dict, image: Path, where: str, problems: list[Problem]) -> int | None:
    """'score': an integer 0..10 (the bigASP recipe's quality score); None when the column is absent."""
    score = entry.get("score")
    if score is None:
        return None
    if isinstance(score, bool) or not isinstance(score, (int, float)) or score != int(score) or not 0 <= score <= 10:
        problems.append(Problem("error", image, f"'score' {score!r} must be an integer from 0 to 10 ({where})"))
        return None
    return int(score)


def collect_items(ds: Dataset) -> tuple[list[Item], list[Problem]]:
    """The dataset's items and the problems found while listing them (images are not opened here)."""
    problems: list[Problem] = []
    items = _from_directory(ds, problems) if ds.image_directory else _from_jsonl(ds, problems)
    by_key: dict[str, Item] = {}
    for item in items:
        if item.key in by_key:
            problems.append(Problem("error", item.image,
                                    f"same name as {by_key[item.key].image}: both would be cached as '{item.key}' in {ds.cache_directory}"))
        else:
            by_key[item.key] = item
    items = list(by_key.values())
    if ds.control_directory is not None:
        candidates = _images_in(ds.control_directory)
        _match_controls(items, candidates)
        for item in items:
            if not item.controls:
                problems.append(Problem("warning", item.image, f"no control image in {ds.control_directory} "
                                                               "(it trains without one)"))
        used = {p for item in items for p in item.controls}
        for extra in sorted(set(candidates) - used):
            problems.append(Problem("warning", extra, "control image without a matching target image (controls are "
                                                      "named <stem>.ext or <stem>_<number>.ext)"))
    for item in items:
        for control in item.controls:
            if not control.exists():
                problems.append(Problem("error", control, f"control image of {item.image.name} not found"))
    return items, problems
