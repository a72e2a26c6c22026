"""Whether model files are SDXL, from what they say (safetensors header keys, diffusers JSON), without importing
torch: the DETECTORS protocol of families/__init__.py (`detect`, `name_hint`), plus the prediction-type flags
ComfyUI writes into single files and `check` for a file given with `--model_version sdxl`.

Files of the SDXL line that the family cannot run (SD 1.x, SD 2.x, the SDXL refiner) are refused in one line."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from flowtuner.errors import ConfigError

VERSION = "sdxl"
_MAX_HEADER = 200 * 1024 * 1024

# First match wins; a marker ending in '*' is a key prefix. verdict: VERSION, or why the file is refused.
SINGLE_FILE: list[tuple[str, tuple[str, ...], str]] = [
    ("an SDXL checkpoint", ("conditioner.embedders.1.model.*", "model.diffusion_model.label_emb.0.0.weight"), VERSION),
    ("an SDXL refiner checkpoint", ("conditioner.embedders.0.model.*",),
     "the SDXL refiner is not supported; use an SDXL base-architecture checkpoint"),
    ("an SD 2.x checkpoint", ("cond_stage_model.model.*",), "SD 2.x is not supported; use an SDXL checkpoint"),
    ("an SD 1.5 checkpoint", ("cond_stage_model.transformer.*",), "SD 1.5 is not supported; use an SDXL checkpoint"),
    ("an SDXL UNet", ("model.diffusion_model.label_emb.0.0.weight",), VERSION),
    ("an SDXL UNet", ("label_emb.0.0.weight", "input_blocks.0.0.weight"), VERSION),
    ("an SDXL UNet (diffusers names)", ("add_embedding.linear_1.weight", "down_blocks.*"), VERSION),
    ("an SD 1.x / 2.x UNet", ("model.diffusion_model.input_blocks.0.0.weight",),
     "SD 1.x / 2.x UNets are not supported (no SDXL size embedding); use an SDXL checkpoint"),
]
PIPELINES = {"StableDiffusionXLPipeline": VERSION, "StableDiffusionXLImg2ImgPipeline": VERSION,
             "StableDiffusionXLInpaintPipeline": VERSION,
             "StableDiffusionPipeline": "SD 1.x / 2.x is not supported; use an SDXL model"}
# ComfyUI's flag keys (comfy/supported_models.py SDXL.model_type) -> what they say
PREDICTION_KEYS = {"v_pred": "v_prediction", "ztsnr": "zero_terminal_snr", "edm_vpred.sigma_max": "v_prediction_edm",
                   "edm_mean": "edm_playground"}


def header_keys(path: Path) -> set[str]:
    """The tensor names of a safetensors file (empty for anything else)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > _MAX_HEADER:
                return set()
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError, UnicodeDecodeError):
        return set()
    return set(header) - {"__metadata__"} if isinstance(header, dict) else set()


def _has(keys: set[str], marker: str) -> bool:
    return any(k.startswith(marker[:-1]) for k in keys) if marker.endswith("*") else marker in keys


def classify(keys: set[str]) -> tuple[str, str] | None:
    """(what the keys are, verdict) or None when they are nothing of the SD line."""
    for what, markers, verdict in SINGLE_FILE:
        if all(_has(keys, m) for m in markers):
            return what, verdict
    return None


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _folder(path: Path) -> tuple[str, str] | None:
    index = path / "model_index.json"
    pipeline = _json(index).get("_class_name")
    if pipeline in PIPELINES:
        return f"{index} names {pipeline}", PIPELINES[pipeline]
    for config in (path / "unet" / "config.json", path / "config.json"):
        data = _json(config)
        if data.get("_class_name") == "UNet2DConditionModel":
            if data.get("addition_embed_type") == "text_time":
                return f"{config} has addition_embed_type text_time", VERSION
            return f"{config} is a UNet without SDXL's text_time embedding", "SD 1.x / 2.x UNets are not supported"
    return None


def _verdict(path: Path) -> tuple[str, str] | None:
    if path.is_dir():
        return _folder(path)
    found = classify(header_keys(path)) if path.is_file() else None
    return (f"{path} is {found[0]}", found[1]) if found else None


def detect(dit: str | None, model: str | None) -> tuple[str | None, str]:
    """("sdxl", evidence) when a file or folder is SDXL; a refused member of the SD line raises ConfigError."""
    for given in (dit, model):
        if not given:
            continue
        found = _verdict(Path(given))
        if found is None:
            continue
        evidence, verdict = found
        if verdict != VERSION:
            raise ConfigError(f"{given}: {verdict}.")
        hints = prediction_hints(given)
        return VERSION, evidence + (f" (flags: {', '.join(hints)})" if hints else "")
    return None, ""


def name_hint(dit: str | None) -> str | None:
    name = Path(dit).name.lower() if dit else ""
    return VERSION if "sdxl" in name or "sd_xl" in name else None


def prediction_hints(path: str | Path) -> tuple[str, ...]:
    """What a single file's flag keys say about its prediction type (ComfyUI's convention): e.g.
    ("v_prediction", "zero_terminal_snr"); () for a plain (epsilon) checkpoint or a folder."""
    path = Path(path)
    keys = header_keys(path) if path.is_file() else set()
    return tuple(meaning for key, meaning in PREDICTION_KEYS.items() if key in keys)


def check(path: str | Path) -> None:
    """One line for a file given as SDXL that is not (a Qwen-Image DiT, SD 1.5, ...)."""
    path = Path(path)
    found = _verdict(path)
    if found is not None and found[1] == VERSION:
        return
    if found is not None:
        raise ConfigError(f"{path}: {found[1]}.")
    what = "not a model file flowtuner reads"
    if path.is_file() and header_keys(path):
        from flowtuner.families.identify import describe
        from flowtuner.weights.reader import open_checkpoint

        what = describe(open_checkpoint(path))
    elif not path.exists():
        what = "missing"
    raise ConfigError(f"{path}: expected an SDXL checkpoint (--model_version sdxl), but this is {what}.")
