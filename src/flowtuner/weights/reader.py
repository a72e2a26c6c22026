"""A safetensors reader that materialises each tensor exactly once.

Why not `safetensors.safe_open`: it memory-maps the file, so every page it touches counts toward the
process RSS on top of the copy torch keeps; loading a 38 GB DiT would peak near twice its size. Here
each tensor is read with `readinto` straight into its final torch storage, and the header is checked
against the file size first, so a truncated download is reported before any model is built.
"""

from __future__ import annotations

import json
import os
import re
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flowtuner.errors import WeightsError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}
SHARD_RE = re.compile(r"^(?P<stem>.*)-(?P<idx>\d{5})-of-(?P<total>\d{5})\.safetensors$")
MAX_HEADER = 200 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in `file`
    nbytes: int


@dataclass
class Checkpoint:
    """The tensors of one checkpoint (one file, or the shards of a sharded folder), read lazily."""

    path: Path
    entries: dict[str, TensorEntry]
    metadata: dict[str, str] = field(default_factory=dict)
    files: tuple[Path, ...] = ()

    def keys(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self.entries[key].dtype

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def read(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor `key`, read into `out` when given (contiguous, same shape and dtype): a batch can
        be filled in place, without a stacking copy."""
        entry = self.entries[key]
        if out is None:
            tensor = torch.empty(entry.shape, dtype=entry.dtype)
        elif tuple(out.shape) != entry.shape or out.dtype != entry.dtype or not out.is_contiguous():
            raise WeightsError(f"{self.path}: {key} is {entry.dtype} {list(entry.shape)}, expected {out.dtype} {list(out.shape)}.")
        else:
            tensor = out
        if entry.nbytes:
            view = tensor.reshape(-1).view(torch.uint8).numpy()
            with open(entry.file, "rb") as f:
                f.seek(entry.start)
                got = f.readinto(memoryview(view))
            if got != entry.nbytes:
                raise WeightsError(f"{self.path}: tensor {key!r} is cut short; the file is truncated. Download it again.")
        return tensor

    def select(self, prefix: str) -> "Checkpoint":
        """The tensors under `prefix`, with the prefix removed (e.g. `model.diffusion_model.`)."""
        n = len(prefix)
        entries = {k[n:]: e for k, e in self.entries.items() if k.startswith(prefix)}
        return Checkpoint(self.path, entries, self.metadata, self.files)

    def count_prefix(self, prefix: str) -> int:
        return sum(1 for k in self.entries if k.startswith(prefix))


def _sniff_foreign(path: Path) -> str | None:
    """Say what a non-safetensors file looks like, or None when it may be safetensors."""
    with open(path, "rb") as f:
        head = f.read(8)
    if path.suffix.lower() in PICKLE_SUFFIXES or head[:2] == b"PK" or (head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05"):
        return (
            "a pickled PyTorch checkpoint; flowtuner loads .safetensors only, because unpickling can run "
            "arbitrary code. Convert it to safetensors first"
        )
    if head[:4] == b"GGUF":
        return "a GGUF file, which flowtuner does not load; use the bf16 or fp8 .safetensors release"
    return None


def _parse_header(path: Path) -> tuple[dict, int, int]:
    """(header, data start, file size), with one open."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise WeightsError(f"{path}: the file is empty or truncated ({size} bytes). Download it again.")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER or n + 8 > size:
            raise WeightsError(f"{path}: not a safetensors file, or truncated (header claims {n} bytes, file has {size}).")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WeightsError(f"{path}: not a safetensors file (its header is not JSON).") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: not a safetensors file (its header is not a JSON object).")
    return header, 8 + n, size


def _read_file(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise WeightsError(f"{path}: {_sniff_foreign(path)}.")
    try:
        header, base, size = _parse_header(path)
    except WeightsError:
        foreign = _sniff_foreign(path)
        if foreign:
            raise WeightsError(f"{path}: {foreign}.") from None
        raise
    metadata = header.pop("__metadata__", None) or {}
    entries: dict[str, TensorEntry] = {}
    for key, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            start, end = info["data_offsets"]
            shape = tuple(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{path}: tensor {key!r} has an unknown dtype or a malformed header entry.") from None
        if base + end > size:
            raise WeightsError(
                f"{path}: truncated: tensor {key!r} ends at byte {base + end} but the file has {size} bytes. Download it again."
            )
        entries[key] = TensorEntry(path, dtype, shape, base + start, end - start)
    return entries, {str(k): str(v) for k, v in metadata.items()}


def _shards_of(path: Path) -> list[Path]:
    m = SHARD_RE.match(path.name)
    if not m:
        return [path]
    total = int(m["total"])
    shards = [path.with_name(f"{m['stem']}-{i:05d}-of-{total:05d}.safetensors") for i in range(1, total + 1)]
    missing = [s.name for s in shards if not s.exists()]
    if missing:
        raise WeightsError(f"{path}: sharded checkpoint is incomplete; missing {', '.join(missing)}.")
    return shards


def _files_in_dir(path: Path) -> list[Path]:
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise WeightsError(f"{indexes[0]}: not a valid safetensors index (no weight_map).") from None
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise WeightsError(f"{path}: sharded checkpoint is incomplete; missing {', '.join(missing)}.")
        return files
    files = sorted(path.glob("*.safetensors"))
    if len(files) == 1:
        return files
    pickles = [p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
    if not files and pickles:
        raise WeightsError(f"{path}: holds only pickled weights ({pickles[0]}); flowtuner loads .safetensors only.")
    if not files:
        raise WeightsError(f"{path}: no .safetensors file in this folder.")
    raise WeightsError(f"{path}: several .safetensors files and no *.safetensors.index.json; point at one file.")


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a single file, one shard of a `-0000N-of-0000M` set, or a (sharded) folder."""
    path = Path(path)
    try:
        is_dir = stat.S_ISDIR(os.stat(path).st_mode)
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such file or folder.") from None
    files = _files_in_dir(path) if is_dir else _shards_of(path)
    entries: dict[str, TensorEntry] = {}
    metadata: dict[str, str] = {}
    for file in files:
        part, meta = _read_file(file)
        entries.update(part)
        metadata = metadata or meta
    return Checkpoint(path, entries, metadata, tuple(files))
