"""Cache files in musubi-tuner's format, plus provenance that makes staleness detectable.

Names, tensor keys, shapes and musubi's metadata are kept, so either tool reads the other's caches:
  latents: {cache_dir}/{stem}_{W:04d}x{H:04d}_{arch}.safetensors  (W x H = the original image size)
           key latents_1x{h}x{w}_{dtype}: [16, 1, h, w], normalised, posterior mode
           edit models: latents_control_{i}_1x{h}x{w}_{dtype} per control image, each at its own size
  text:    {cache_dir}/{stem}_{arch}_te.safetensors
           the family's tensors, each key {name}_{dtype} (Qwen-Image: varlen_vl_embed_{dtype}: [L, D])
flowtuner adds `flowtuner.*` metadata: what the cache was made from (source file identity, bucket,
caption, model weights, recipe; the control images' identities, sizes and sizing rule), and a digest of
the file's content (tensors and the other metadata).
The digest tells flowtuner's own, unchanged output from a file another tool wrote or rewrote
(musubi-tuner keeps the existing metadata when it re-caches text): only its own output is ever
replaced or removed; any other cache is "unverified" and left alone. A cache of flowtuner's is fresh
only when all of its record still holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from flowtuner.weights.reader import Checkpoint, open_checkpoint
from flowtuner.weights.writer import atomic_save_safetensors

FORMAT_VERSION = "1.0.1"  # musubi-tuner's cache format version
PROVENANCE_PREFIX = "flowtuner."
CONTENT_KEY = PROVENANCE_PREFIX + "content"
CONTROL_PREFIX = "latents_control_"
FRESH, MISSING, STALE, UNVERIFIED, CORRUPT = "fresh", "missing", "stale", "unverified", "corrupt"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def latent_cache_path(cache_dir: Path, key: str, size: tuple[int, int], arch: str) -> Path:
    return cache_dir / f"{key}_{size[0]:04d}x{size[1]:04d}_{arch}.safetensors"


def text_cache_path(cache_dir: Path, key: str, arch: str) -> Path:
    return cache_dir / f"{key}_{arch}_te.safetensors"


def latent_tensor_key(latent: torch.Tensor, name: str = "latents") -> str:
    _, f, h, w = latent.shape
    return f"{name}_{f}x{h}x{w}_{dtype_name(latent.dtype)}"


def control_tensor_key(index: int, latent: torch.Tensor) -> str:
    """musubi-tuner's key of an edit model's i-th control latent."""
    return latent_tensor_key(latent, f"{CONTROL_PREFIX}{index}")


def tensor_key(name: str, tensor: torch.Tensor) -> str:
    """musubi-tuner's cache key: the tensor's name, then its dtype."""
    return f"{name}_{dtype_name(tensor.dtype)}"


# prompt variants (dataset option prompt_variants = K): variant 0 under the family's plain names, the others as
# "v{k}.{name}" in the same file, so a K = 1 cache is exactly the plain one
_VARIANT = re.compile(r"^v(\d+)\.(.+)$")


def variant_name(name: str, k: int) -> str:
    return name if k == 0 else f"v{k}.{name}"


def split_variant(name: str) -> tuple[int, str]:
    """(variant number, the family's tensor name) of a text-cache tensor name (no dtype suffix)."""
    m = _VARIANT.match(name)
    return (int(m[1]), m[2]) if m else (0, name)


def tensor_name(key: str) -> str:
    """A cache key without its dtype suffix (the key itself when it has none)."""
    name, _, suffix = key.rpartition("_")
    return name if name and isinstance(getattr(torch, suffix, None), torch.dtype) else key


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def source_identity(path: Path, with_hash: bool = True) -> dict:
    st = path.stat()
    ident = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if with_hash:
        ident["sha256"] = sha256_file(path)
    return ident


def weights_identity(ckpt: Checkpoint, samples: int = 16, sample_bytes: int = 4096) -> str:
    """A cheap fingerprint of a model's weights: its tensor names, shapes and dtypes, plus a few KB
    from evenly spaced tensors (hashing the whole 15 GB text encoder would take minutes)."""
    digest = hashlib.sha256()
    keys = sorted(ckpt.keys())
    for key in keys:
        e = ckpt.entries[key]
        digest.update(f"{key}:{e.shape}:{e.dtype};".encode())
    for key in keys[:: max(1, len(keys) // samples)]:
        e = ckpt.entries[key]
        with open(e.file, "rb") as f:
            f.seek(e.start)
            digest.update(f.read(min(sample_bytes, e.nbytes)))
    return digest.hexdigest()[:32]


def provenance_metadata(**fields) -> dict[str, str]:
    return {PROVENANCE_PREFIX + k: json.dumps(v, sort_keys=True) for k, v in fields.items()}


def read_provenance(metadata: dict[str, str]) -> dict:
    return {k[len(PROVENANCE_PREFIX):]: json.loads(v) for k, v in metadata.items() if k.startswith(PROVENANCE_PREFIX)}


class _ContentHash:
    """SHA-256 over each tensor (name, dtype, shape, bytes; by name) and the metadata other than the digest
    itself: independent of the file layout, so it can be computed from the tensors before they are written."""

    def __init__(self):
        self._hash = hashlib.sha256()

    def tensor(self, name: str, dtype: torch.dtype, shape, data) -> None:
        self._hash.update(f"{name}|{dtype_name(dtype)}|{list(shape)}|{len(data)};".encode())
        self._hash.update(data)

    def result(self, metadata: dict[str, str]) -> str:
        rest = {k: v for k, v in metadata.items() if k != CONTENT_KEY}
        self._hash.update(json.dumps(rest, sort_keys=True).encode())
        return self._hash.hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def content_digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    digest = _ContentHash()
    for name in sorted(tensors):
        digest.tensor(name, tensors[name].dtype, tensors[name].shape, _tensor_bytes(tensors[name]))
    return digest.result(metadata)


def file_content_digest(ckpt: Checkpoint) -> str:
    """The content digest of a cache file as it is on disk (reads every tensor's bytes)."""
    digest = _ContentHash()
    with open(ckpt.path, "rb") as f:
        for name in sorted(ckpt.entries):
            entry = ckpt.entries[name]
            f.seek(entry.start)
            digest.tensor(name, entry.dtype, entry.shape, f.read(entry.nbytes))
    return digest.result(ckpt.metadata)


def is_own_output(ckpt: Checkpoint) -> bool:
    """Whether flowtuner wrote this file and nothing has changed it since."""
    recorded = read_provenance(ckpt.metadata).get("content")
    return recorded is not None and recorded == file_content_digest(ckpt)


def written_by_flowtuner(path: Path) -> bool:
    """`is_own_output` for a path; an unreadable file is not provably flowtuner's."""
    try:
        return is_own_output(open_checkpoint(path))
    except Exception:  # noqa: BLE001 - whatever makes it unreadable, it is not shown to be ours
        return False


def save_cache(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], provenance: dict) -> None:
    """Write a cache atomically with musubi-tuner's `metadata`, flowtuner's provenance and the content digest."""
    meta = {**metadata, **provenance_metadata(**provenance)}
    meta[CONTENT_KEY] = json.dumps(content_digest(tensors, meta))
    atomic_save_safetensors(tensors, path, meta)


def save_latent_cache(path: Path, latent: torch.Tensor, architecture: str, size: tuple[int, int], provenance: dict,
                      controls: list[torch.Tensor] = (), extras: dict[str, torch.Tensor] | None = None) -> None:
    """musubi-tuner's latent cache: latent [C, F, h, w], and an edit model's control latents in order;
    `size` = the original image's (W, H); `extras`: other per-image tensors by name (e.g. the crop), each key
    `{name}_{dtype}`."""
    meta = {"architecture": architecture, "width": str(size[0]), "height": str(size[1]), "format_version": FORMAT_VERSION}
    tensors = {latent_tensor_key(latent): latent, **{control_tensor_key(i, c): c for i, c in enumerate(controls)}}
    tensors.update({tensor_key(name, t): t for name, t in (extras or {}).items()})
    save_cache(path, tensors, meta, provenance)


def save_text_cache(path: Path, tensors: dict[str, torch.Tensor], architecture: str, caption: str, provenance: dict) -> None:
    """musubi-tuner's text-encoder cache: the family's tensors by name (the key gets the dtype suffix)."""
    meta = {"architecture": architecture, "caption1": caption, "format_version": FORMAT_VERSION}
    save_cache(path, {tensor_key(name, t): t for name, t in tensors.items()}, meta, provenance)


@dataclass
class Status:
    state: str  # FRESH, MISSING, STALE, UNVERIFIED, CORRUPT
    reason: str = ""


def _file_changed(recorded: dict | None, path: Path) -> bool:
    """Whether `path` differs from its recorded identity: size, then content hash when the mtime moved (a
    touched but unchanged file has not changed)."""
    recorded = recorded or {}
    st = path.stat()
    if recorded.get("size") != st.st_size:
        return True
    return recorded.get("mtime_ns") != st.st_mtime_ns and recorded.get("sha256") != sha256_file(path)


def check_cache(path: Path, expected: dict, source: Path | None, controls: list[Path] = ()) -> Status:
    """Compare a cache file's provenance with what it would be made from now.

    A file that is not flowtuner's own, unchanged output is UNVERIFIED (left alone, whatever it holds).
    `expected` holds everything but the identities of the files it is made from: the source image and the
    control images, each compared by `_file_changed`."""
    if not path.exists():
        return Status(MISSING)
    try:
        ckpt = open_checkpoint(path)
        have = read_provenance(ckpt.metadata)
        own = bool(have) and is_own_output(ckpt)
    except Exception as exc:  # an unreadable cache is stale, whatever the reason
        return Status(CORRUPT, f"unreadable ({exc})")
    if not have:
        return Status(UNVERIFIED, "no flowtuner provenance (written by another tool, e.g. musubi-tuner)")
    if not own:
        if "content" not in have:
            return Status(UNVERIFIED, "no content digest (written by an older flowtuner?)")
        return Status(UNVERIFIED, "changed since flowtuner wrote it (rewritten by another tool?)")
    for key, value in expected.items():
        if have.get(key) != value:
            return Status(STALE, f"{key} changed")
    if source is not None and _file_changed(have.get("source"), source):
        return Status(STALE, "source image changed")
    recorded = have.get("control_sources") or []
    if controls and (len(recorded) != len(controls) or any(_file_changed(r, c) for r, c in zip(recorded, controls))):
        return Status(STALE, "control image changed")
    return Status(FRESH)


def shape_of_latent_cache(path: Path) -> tuple[int, ...]:
    ckpt = open_checkpoint(path)
    keys = [k for k in ckpt.keys() if k.startswith("latents_") and not k.startswith(CONTROL_PREFIX)]
    if len(keys) != 1:
        raise ValueError(f"{path}: expected one latents_* tensor, found {len(keys)}")
    return ckpt.shape(keys[0])


def remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
