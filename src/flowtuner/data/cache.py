"""Cache files in musubi-tuner's format, plus provenance that makes staleness detectable.

Names, tensor keys, shapes and musubi's metadata are kept, so either tool reads the other's caches:
  latents: {cache_dir}/{stem}_{W:04d}x{H:04d}_{arch}.safetensors  (W x H = the original image size)
           key latents_1x{h}x{w}_{dtype}: [16, 1, h, w], normalised, posterior mode
  text:    {cache_dir}/{stem}_{arch}_te.safetensors
           key varlen_vl_embed_{dtype}: [L, D], the valid tokens after the template cut
flowtuner adds `flowtuner.*` metadata: what the cache was made from (source file identity, bucket,
caption, model weights, recipe). A cache is fresh only when all of it still holds; a musubi-tuner
cache without it is accepted as "unverified".
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from flowtuner.weights.reader import Checkpoint, open_checkpoint

FORMAT_VERSION = "1.0.1"  # musubi-tuner's cache format version
PROVENANCE_PREFIX = "flowtuner."
FRESH, MISSING, STALE, UNVERIFIED, CORRUPT = "fresh", "missing", "stale", "unverified", "corrupt"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def latent_cache_path(cache_dir: Path, key: str, size: tuple[int, int], arch: str) -> Path:
    return cache_dir / f"{key}_{size[0]:04d}x{size[1]:04d}_{arch}.safetensors"


def text_cache_path(cache_dir: Path, key: str, arch: str) -> Path:
    return cache_dir / f"{key}_{arch}_te.safetensors"


def latent_tensor_key(latent: torch.Tensor) -> str:
    _, f, h, w = latent.shape
    return f"latents_{f}x{h}x{w}_{dtype_name(latent.dtype)}"


def text_tensor_key(embed: torch.Tensor) -> str:
    return f"varlen_vl_embed_{dtype_name(embed.dtype)}"


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


@dataclass
class Status:
    state: str  # FRESH, MISSING, STALE, UNVERIFIED, CORRUPT
    reason: str = ""


def check_cache(path: Path, expected: dict, source: Path | None) -> Status:
    """Compare a cache file's provenance with what it would be made from now.

    `expected` holds everything but the source identity; the source is compared by size and mtime,
    and only when the mtime differs, by content hash (a touched but unchanged file stays fresh)."""
    if not path.exists():
        return Status(MISSING)
    try:
        have = read_provenance(open_checkpoint(path).metadata)
    except Exception as exc:  # an unreadable cache is stale, whatever the reason
        return Status(CORRUPT, f"unreadable ({exc})")
    if not have:
        return Status(UNVERIFIED, "no provenance (made by musubi-tuner?)")
    for key, value in expected.items():
        if have.get(key) != value:
            return Status(STALE, f"{key} changed")
    if source is not None:
        old = have.get("source") or {}
        st = source.stat()
        if old.get("size") != st.st_size:
            return Status(STALE, "source image changed")
        if old.get("mtime_ns") != st.st_mtime_ns and old.get("sha256") != sha256_file(source):
            return Status(STALE, "source image changed")
    return Status(FRESH)


def shape_of_latent_cache(path: Path) -> tuple[int, ...]:
    ckpt = open_checkpoint(path)
    keys = [k for k in ckpt.keys() if k.startswith("latents_") and not k.startswith("latents_control_")]
    if len(keys) != 1:
        raise ValueError(f"{path}: expected one latents_* tensor, found {len(keys)}")
    return ckpt.shape(keys[0])


def remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
