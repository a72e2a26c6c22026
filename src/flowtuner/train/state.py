"""Training state on disk without pickles: tensors in one safetensors file, the structure around them
(optimizer state layout, counters, RNG states) as JSON. A state folder is written under a temporary
name and renamed into place, so a crash never leaves half a state."""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from flowtuner.errors import FlowtunerError


def flatten(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "t") -> Any:
    """JSON-able skeleton of `obj`; tensors and numpy arrays are moved into `tensors`."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = f"{prefix}{len(tensors)}"
        tensors[key] = torch.from_numpy(obj.copy())
        return {"__ndarray__": key, "dtype": str(obj.dtype)}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: flatten(v, tensors, prefix) for k, v in obj.items()}}
        return {"__items__": [[flatten(k, tensors, prefix), flatten(v, tensors, prefix)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__tuple__" if isinstance(obj, tuple) else "__list__": [flatten(v, tensors, prefix) for v in obj]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a training state")


def unflatten(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, dict):
        if "__tensor__" in node:
            return tensors[node["__tensor__"]]
        if "__ndarray__" in node:
            return tensors[node["__ndarray__"]].numpy().astype(node["dtype"])
        if "__dict__" in node:
            return {k: unflatten(v, tensors) for k, v in node["__dict__"].items()}
        if "__items__" in node:
            return {unflatten(k, tensors): unflatten(v, tensors) for k, v in node["__items__"]}
        if "__tuple__" in node:
            return tuple(unflatten(v, tensors) for v in node["__tuple__"])
        if "__list__" in node:
            return [unflatten(v, tensors) for v in node["__list__"]]
    return node


def capture_rng() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(folder: Path, state: dict) -> Path:
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        tensors: dict[str, torch.Tensor] = {}
        skeleton = flatten(state, tensors)
        save_file(tensors, str(tmp / "tensors.safetensors"))
        (tmp / "state.json").write_text(json.dumps(skeleton))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_state(folder: Path) -> dict:
    folder = Path(folder)
    if not (folder / "state.json").exists() or not (folder / "tensors.safetensors").exists():
        raise FlowtunerError(f"--resume {folder}: not a flowtuner state folder (state.json + tensors.safetensors).")
    return unflatten(json.loads((folder / "state.json").read_text()), load_file(str(folder / "tensors.safetensors")))
