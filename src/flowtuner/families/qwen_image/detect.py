"""Which Qwen-Image member model files are, where they say so (no torch import: runs before any model loads).

Unambiguous: a diffusers repo's model_index.json names its pipeline class, and a transformer config.json with
`zero_cond_t: true` is Edit-2511 (the other members' DiTs have identical configs). A single-file DiT says
nothing; musubi-tuner then only warns when the file's name contains "edit" and the flag does not say edit."""

from __future__ import annotations

import json
from pathlib import Path

PIPELINES = {"QwenImagePipeline": "original", "QwenImageEditPipeline": "edit", "QwenImageEditPlusPipeline": "edit-2509"}


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def detect(dit: str | None, model: str | None) -> tuple[str | None, str]:
    configs = []
    if dit and Path(dit).is_dir():
        configs.append(Path(dit) / "config.json")
    if model and Path(model).is_dir():
        configs.append(Path(model) / "transformer" / "config.json")
    for config in configs:
        if _json(config).get("zero_cond_t") is True:
            return "edit-2511", f"{config} has zero_cond_t: true"
    if model and Path(model).is_dir():
        index = Path(model) / "model_index.json"
        pipeline = _json(index).get("_class_name")
        if pipeline in PIPELINES:
            return PIPELINES[pipeline], f"{index} names {pipeline}"
    return None, ""


def name_hint(dit: str | None) -> str | None:
    return "edit" if dit and "edit" in Path(dit).name.lower() else None
