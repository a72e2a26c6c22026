"""Resolve component paths from explicit flags, a Hugging Face repo root (`--model`), and a ComfyUI
install (`--comfyui_dir` / COMFYUI_PATH) where bare file names live under `models/<kind>/`."""

from __future__ import annotations

import os
from pathlib import Path

from flowtuner.errors import FlowtunerError
from flowtuner.families.base import ModelPaths

# slot -> (subfolder of a diffusers repo root, ComfyUI model folders searched in order)
SLOTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "dit": ("transformer", ("diffusion_models", "unet", "checkpoints")),
    "vae": ("vae", ("vae", "checkpoints")),
    "text_encoder": ("text_encoder", ("text_encoders", "clip", "checkpoints")),
    "tokenizer": ("tokenizer", ()),
}


def comfyui_root(flag: str | Path | None) -> Path | None:
    value = flag or os.environ.get("COMFYUI_PATH")
    return Path(value) if value else None


def _resolve_one(slot: str, given: str | Path | None, model_root: Path | None, comfy: Path | None) -> Path | None:
    repo_sub, comfy_subs = SLOTS[slot]
    if given is not None:
        path = Path(given)
        if path.exists():
            return path
        tried = [str(path)]
        if comfy is not None and not path.is_absolute():
            for sub in comfy_subs:
                cand = comfy / "models" / sub / path
                if cand.exists():
                    return cand
                tried.append(str(cand))
        raise FlowtunerError(f"--{slot} {given}: not found (looked at {', '.join(tried)}).")
    if model_root is not None and (model_root / repo_sub).exists():
        return model_root / repo_sub
    return None


def resolve_paths(
    dit=None, vae=None, text_encoder=None, tokenizer=None, model=None, comfyui_dir=None, **_ignored
) -> ModelPaths:
    root = Path(model) if model is not None else None
    if root is not None and not root.is_dir():
        raise FlowtunerError(f"--model {model}: not a folder (expected a Hugging Face repo root with transformer/, vae/, text_encoder/).")
    comfy = comfyui_root(comfyui_dir)
    if comfy is not None and not comfy.is_dir():
        raise FlowtunerError(f"--comfyui_dir {comfy}: not a folder.")
    given = {"dit": dit, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer}
    resolved = {slot: _resolve_one(slot, value, root, comfy) for slot, value in given.items()}
    return ModelPaths(**resolved, comfyui_dir=comfy, model_root=root)


def require(paths: ModelPaths, slot: str) -> Path:
    path = getattr(paths, slot)
    if path is None:
        raise FlowtunerError(f"no {slot.replace('_', ' ')} given: pass --{slot} FILE, or --model DIR with a {SLOTS[slot][0]}/ folder.")
    return path
