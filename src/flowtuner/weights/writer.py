"""Atomic writes: a temporary file in the target folder, fsync, then rename. A killed run never
leaves a half-written file under the final name."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file


def _tmp_in(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if `path` exists: never overwrite
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(data: bytes, path: str | Path, overwrite: bool = True) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_in(path)
    try:
        tmp.write_bytes(data)
        _publish(tmp, path, overwrite)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None, overwrite: bool = True
) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_in(path)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        _publish(tmp, path, overwrite)
    finally:
        tmp.unlink(missing_ok=True)


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def stream_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None,
                            dtype: torch.dtype | None = None) -> None:
    """Write a safetensors file one tensor at a time (each cast and moved to the CPU just before it is
    written), so peak extra memory is one tensor rather than the whole model."""
    import json
    import struct

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out_dtype = {k: (dtype if dtype is not None and v.is_floating_point() else v.dtype) for k, v in tensors.items()}
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key, value in tensors.items():
        nbytes = value.numel() * torch.empty((), dtype=out_dtype[key]).element_size()
        header[key] = {"dtype": SAFETENSORS_DTYPES[out_dtype[key]], "shape": list(value.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = _tmp_in(path)
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for key, value in tensors.items():
                cpu = value.detach().to(out_dtype[key]).cpu().contiguous()
                if cpu.numel():
                    f.write(memoryview(cpu.reshape(-1).view(torch.uint8).numpy()))
        _publish(tmp, path, True)
    finally:
        tmp.unlink(missing_ok=True)
