"""musubi-tuner's dataset config (TOML or JSON), as typed dataclasses: the single source of the
schema, the defaults and the docs. Value lookup: [[datasets]] entry, then [general], then the command
line (e.g. caching --batch_size), then the defaults below. Relative paths resolve against the working
directory, as musubi-tuner resolves them, so both tools read and write the same folders."""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowtuner.config.fields import opt
from flowtuner.data.buckets import BUCKET_RULES, CROPS, MUSUBI_RULE
from flowtuner.errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

log = logging.getLogger(__name__)


@dataclass
class GeneralSettings:
    """Keys allowed in [general]; each may be overridden per dataset."""

    resolution: Any = opt([960, 544], "training size as [W, H] (or one int for a square); the bucket area")
    caption_extension: str | None = opt(None, "caption file suffix beside each image (default .txt)")
    batch_size: int = opt(1, "items per batch (one bucket per batch)")
    num_repeats: int = opt(1, "times each item appears per epoch")
    enable_bucket: bool = opt(False, "aspect-ratio buckets of equal area; otherwise every image is cropped to resolution")
    bucket_no_upscale: bool = opt(False, "with buckets: images smaller than the bucket area keep their size (floored to the step)")
    bucket_rule: str = opt("musubi", "flowtuner only: 'musubi' (musubi-tuner's buckets from resolution / enable_bucket) or "
                                     "'bigasp' (the bigASP SDXL recipe's fixed 31 buckets; resolution is not used)")
    bucket_crop: str = opt("center", "flowtuner only, fixed-list rules: 'center' or 'random' (one random crop per item, "
                                     "recorded in its latent cache)")
    prompt_variants: int = opt(1, "flowtuner only: prompts cache-text writes per item, drawn by the model's prompt recipe "
                                  "(SDXL: bigASP's, from JSONL caption / tags / score); training picks one per epoch; "
                                  "1 = the caption as is")
    shards: str | None = opt(None, "flowtuner only: train from cache shards (a folder or s3://bucket/prefix written by "
                                   "cache-latents/cache-text --to_shards) instead of the cache files; the images and "
                                   "cache_directory are then not needed (docs/scale.md, Streaming)")
    shards_cache: str | None = opt(None, "flowtuner only: local folder keeping whole data files of s3:// shards for reuse "
                                         "(default <XDG_CACHE_HOME or ~/.cache>/flowtuner/shards; 'none' reads every epoch "
                                         "from the store)")
    shards_cache_limit: Any = opt("20GB", "flowtuner only: size limit of shards_cache, bytes or e.g. '500MB', '20GB'; "
                                          "least recently used data files are evicted beyond it")


@dataclass
class DatasetSettings(GeneralSettings):
    """Keys allowed in one [[datasets]] entry."""

    image_directory: str | None = opt(None, "folder of images with <stem><caption_extension> captions")
    image_jsonl_file: str | None = opt(None, "JSONL: one {\"image_path\", \"caption\", [\"control_path\"...]} object per line")
    cache_directory: str | None = opt(None, "where caches go; default image_directory; required for JSONL; unique per dataset")
    control_directory: str | None = opt(None, "edit models: control images named <stem>.* or <stem>_N.*")
    control_resolution: Any = opt(None, "edit models: bucket control images to this area ([W, H] or int)")
    no_resize_control: bool = opt(False, "edit models: keep control images at native size (floored to the step)")


DEPRECATED = {"qwen_image_edit_no_resize_control": "no_resize_control", "flux_kontext_no_resize_control": "no_resize_control",
              "qwen_image_edit_control_resolution": "control_resolution"}
UNSUPPORTED = {
    "video_directory": "video datasets are not supported by flowtuner",
    "video_jsonl_file": "video datasets are not supported by flowtuner",
    "multiple_target": "Qwen-Image-Layered datasets are not supported yet",
    "fp_latent_window_size": "FramePack keys do not apply to image models",
    "fp_1f_clean_indices": "FramePack keys do not apply to image models",
    "fp_1f_target_index": "FramePack keys do not apply to image models",
    "fp_1f_no_post": "FramePack keys do not apply to image models",
}
GENERAL_KEYS = [f.name for f in dataclasses.fields(GeneralSettings)]
DATASET_KEYS = [f.name for f in dataclasses.fields(DatasetSettings)]


@dataclass
class Dataset:
    """One dataset with every value resolved; paths absolute."""

    index: int
    resolution: tuple[int, int]  # (W, H)
    caption_extension: str
    batch_size: int
    num_repeats: int
    enable_bucket: bool
    bucket_no_upscale: bool
    image_directory: Path | None
    image_jsonl_file: Path | None
    cache_directory: Path
    control_directory: Path | None
    control_resolution: tuple[int, int] | None
    no_resize_control: bool
    bucket_rule: str = "musubi"
    bucket_crop: str = "center"
    prompt_variants: int = 1
    shards: str | None = None  # a Lance dataset of the caches (data/streaming.py): read instead of cache_directory
    shards_cache: str | None = None  # folder of local copies of remote shards' data files; None: the platform default; "none": off
    shards_cache_limit: int = 20 * 10**9  # bytes

    @property
    def name(self) -> str:
        return f"datasets[{self.index}] ({self.image_directory or self.image_jsonl_file or self.shards})"


def _where(file: Path, section: str) -> str:
    return f"{file}: {section}"


def _check_keys(table: dict, allowed: list[str], file: Path, section: str) -> dict:
    out = {}
    for key, value in table.items():
        if key in DEPRECATED:
            log.warning("%s: '%s' is deprecated; use '%s'", _where(file, section), key, DEPRECATED[key])
            key = DEPRECATED[key]
        if key in UNSUPPORTED:
            raise ConfigError(f"{_where(file, section)}: '{key}': {UNSUPPORTED[key]}.")
        if key not in allowed:
            near = difflib.get_close_matches(key, allowed, n=1, cutoff=0.5)
            hint = f"; did you mean '{near[0]}'?" if near else f"; valid keys: {', '.join(allowed)}"
            raise ConfigError(f"{_where(file, section)}: unknown key '{key}'{hint}")
        out[key] = value
    return out


def _resolution(value: Any, file: Path, section: str, key: str) -> tuple[int, int]:
    if isinstance(value, bool):
        value = None
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return (int(value[0]), int(value[1]))
    raise ConfigError(f"{_where(file, section)}: '{key}' must be an int or [W, H], got {value!r}.")


def _typed(name: str, value: Any, file: Path, section: str) -> Any:
    want = {f.name: f.type for f in dataclasses.fields(DatasetSettings)}[name]
    checks = {"int": int, "bool": bool}
    for tname, typ in checks.items():
        if want == tname and (not isinstance(value, typ) or (typ is int and isinstance(value, bool))):
            raise ConfigError(f"{_where(file, section)}: '{name}' must be {'true/false' if typ is bool else 'an integer'}, got {value!r}.")
    if want.startswith("str") and value is not None and not isinstance(value, str):
        raise ConfigError(f"{_where(file, section)}: '{name}' must be a string, got {value!r}.")
    return value


def _read(file: Path) -> dict:
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read dataset config ({exc.strerror}).") from None
    try:
        return json.loads(text) if file.suffix.lower() == ".json" else tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: invalid TOML: {exc}.") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{file}: invalid JSON at line {exc.lineno}: {exc.msg}.") from None


_LOGGED: set[tuple] = set()


def _resolve_path(value: str | None, key: str, file: Path, section: str) -> Path | None:
    """musubi-tuner passes these strings straight to glob/open: a relative path is relative to the working
    directory (not to the config file). Each relative one is logged once, with where it resolved."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    resolved = Path.cwd() / path
    if (file, section, key, resolved) not in _LOGGED:
        _LOGGED.add((file, section, key, resolved))
        beside = file.parent.resolve() / path
        hint = f"; note: {beside} (beside the config) is not used" if beside.exists() and beside != resolved.resolve() else ""
        log.info("%s: %s '%s' is %s (relative paths resolve against the working directory, as in musubi-tuner)%s",
                 _where(file, section), key, value, resolved, hint)
    return resolved


def _missing_path_hint(value: str, file: Path) -> str:
    beside = file.parent.resolve() / Path(value).expanduser()
    if not Path(value).expanduser().is_absolute() and beside.exists():
        return (f"; relative paths resolve against the working directory (as in musubi-tuner), and {beside} exists: "
                f"run from {file.parent.resolve()} or give an absolute path")
    return ""


def load_dataset_config(file: str | Path, fallbacks: dict[str, Any] | None = None) -> list[Dataset]:
    file = Path(file)
    raw = _read(file)
    top = _check_keys(raw, ["general", "datasets"], file, "top level")
    general = _check_keys(top.get("general", {}), GENERAL_KEYS, file, "[general]")
    entries = top.get("datasets")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{file}: no [[datasets]] entries.")
    defaults = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
                for f in dataclasses.fields(DatasetSettings)}
    fallbacks = {k: v for k, v in (fallbacks or {}).items() if v is not None}
    datasets = [_resolve_entry(i, e, general, fallbacks, defaults, file) for i, e in enumerate(entries)]
    _check_unique_caches(datasets, file)
    return datasets


def _resolve_entry(i: int, entry: Any, general: dict, fallbacks: dict, defaults: dict, file: Path) -> Dataset:
    section = f"[[datasets]] #{i + 1}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{_where(file, section)}: must be a table.")
    entry = _check_keys(entry, DATASET_KEYS, file, section)
    value = {k: _typed(k, entry.get(k, general.get(k, fallbacks.get(k, defaults[k]))), file, section) for k in DATASET_KEYS}
    if value["shards"] is not None and value["image_directory"] is None and value["image_jsonl_file"] is None:
        return _shards_only(i, value, file, section)
    if value["image_directory"] is None and value["image_jsonl_file"] is None:
        raise ConfigError(f"{_where(file, section)}: give 'image_directory' or 'image_jsonl_file' (or 'shards').")
    if value["image_directory"] is not None and value["image_jsonl_file"] is not None:
        log.warning("%s: both 'image_directory' and 'image_jsonl_file' are given; image_directory is used and the JSONL "
                    "ignored, as musubi-tuner does", _where(file, section))
        value["image_jsonl_file"] = None
    key = "image_directory" if value["image_directory"] is not None else "image_jsonl_file"
    source = _resolve_path(value[key], key, file, section)
    image_dir, jsonl = (source, None) if key == "image_directory" else (None, source)
    if not source.exists():
        raise ConfigError(f"{_where(file, section)}: {key} {source} does not exist{_missing_path_hint(value[key], file)}.")
    if source.is_dir() != (image_dir is not None):
        raise ConfigError(f"{_where(file, section)}: {key} {source} is {'a folder' if source.is_dir() else 'a file'}; "
                          f"'{key}' takes {'a folder' if image_dir is not None else 'a JSONL file'}.")
    cache = _resolve_path(value["cache_directory"], "cache_directory", file, section)
    if cache is None:
        if jsonl is not None:
            raise ConfigError(f"{_where(file, section)}: 'cache_directory' is required with image_jsonl_file.")
        cache = image_dir
    control = _resolve_path(value["control_directory"], "control_directory", file, section)
    if control is not None and not control.is_dir():
        raise ConfigError(f"{_where(file, section)}: control_directory {control} does not exist"
                          f"{_missing_path_hint(value['control_directory'], file)}.")
    for key in ("batch_size", "num_repeats", "prompt_variants"):
        if value[key] < 1:
            raise ConfigError(f"{_where(file, section)}: '{key}' must be >= 1, got {value[key]}.")
    _check_bucket_rule(value, file, section)
    ctrl_res = value["control_resolution"]
    return Dataset(
        index=i, resolution=_resolution(value["resolution"], file, section, "resolution"),
        caption_extension=value["caption_extension"] or ".txt", batch_size=value["batch_size"],
        num_repeats=value["num_repeats"], enable_bucket=value["enable_bucket"], bucket_no_upscale=value["bucket_no_upscale"],
        image_directory=image_dir, image_jsonl_file=jsonl, cache_directory=cache, control_directory=control,
        control_resolution=None if ctrl_res is None else _resolution(ctrl_res, file, section, "control_resolution"),
        no_resize_control=value["no_resize_control"], bucket_rule=value["bucket_rule"], bucket_crop=value["bucket_crop"],
        prompt_variants=value["prompt_variants"], shards=_shards_url(value["shards"], file, section),
        **_shards_cache(value, file, section),
    )


def _shards_url(value: str | None, file: Path, section: str) -> str | None:
    """An s3:// URL as is; a local folder resolved as the other paths are."""
    if value is None or "://" in value:
        return value
    return str(_resolve_path(value, "shards", file, section))


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _shards_cache(value: dict, file: Path, section: str) -> dict:
    """shards_cache (a folder resolved as the other paths are, or 'none') and shards_cache_limit in bytes."""
    limit = value["shards_cache_limit"]
    if isinstance(limit, str):
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", limit)
        unit = m and SIZE_UNITS.get(m[2].upper())
        if not unit:
            raise ConfigError(f"{_where(file, section)}: shards_cache_limit {limit!r}: give bytes or a size such as '500MB', '20GB'.")
        limit = int(float(m[1]) * unit)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ConfigError(f"{_where(file, section)}: shards_cache_limit must be a positive size (bytes or e.g. '20GB'), got {limit!r}.")
    folder = value["shards_cache"]
    if folder is not None:
        folder = "none" if folder.lower() == "none" else str(_resolve_path(folder, "shards_cache", file, section))
    return {"shards_cache": folder, "shards_cache_limit": limit}


def _shards_only(i: int, value: dict, file: Path, section: str) -> Dataset:
    """A dataset trained from shards alone: no image source or cache folder on this machine (its cache_directory
    is a placeholder no command reads: scan_caches reads the shards)."""
    for key in ("batch_size", "num_repeats", "prompt_variants"):
        if value[key] < 1:
            raise ConfigError(f"{_where(file, section)}: '{key}' must be >= 1, got {value[key]}.")
    _check_bucket_rule(value, file, section)
    shards = _shards_url(value["shards"], file, section)
    return Dataset(
        index=i, resolution=_resolution(value["resolution"], file, section, "resolution"),
        caption_extension=value["caption_extension"] or ".txt", batch_size=value["batch_size"],
        num_repeats=value["num_repeats"], enable_bucket=value["enable_bucket"], bucket_no_upscale=value["bucket_no_upscale"],
        image_directory=None, image_jsonl_file=None, cache_directory=Path(shards), control_directory=None,
        control_resolution=None, no_resize_control=value["no_resize_control"], bucket_rule=value["bucket_rule"],
        bucket_crop=value["bucket_crop"], prompt_variants=value["prompt_variants"], shards=shards,
        **_shards_cache(value, file, section),
    )


def _check_bucket_rule(value: dict, file: Path, section: str) -> None:
    rules = [MUSUBI_RULE, *BUCKET_RULES]
    if value["bucket_rule"] not in rules:
        raise ConfigError(f"{_where(file, section)}: bucket_rule {value['bucket_rule']!r}: choose one of {', '.join(rules)}.")
    if value["bucket_crop"] not in CROPS:
        raise ConfigError(f"{_where(file, section)}: bucket_crop {value['bucket_crop']!r}: choose one of {', '.join(CROPS)}.")
    if value["bucket_rule"] == MUSUBI_RULE and value["bucket_crop"] != "center":
        raise ConfigError(f"{_where(file, section)}: bucket_crop {value['bucket_crop']!r} needs a fixed-list bucket_rule "
                          "(e.g. 'bigasp'); musubi-tuner's rule always centre-crops.")


def _check_unique_caches(datasets: list[Dataset], file: Path) -> None:
    seen: dict[Path, Dataset] = {}
    for ds in datasets:
        if ds.shards and ds.image_directory is None and ds.image_jsonl_file is None:
            continue  # several datasets may read one shards URL (each its own rows)
        key = ds.cache_directory.resolve()
        if key in seen:
            raise ConfigError(
                f"{file}: [[datasets]] #{seen[key].index + 1} and #{ds.index + 1} share cache_directory {ds.cache_directory}; "
                "give each dataset its own."
            )
        seen[key] = ds
