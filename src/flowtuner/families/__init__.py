"""Model families: the only code that knows a model. A registry: shared code asks `family_for(cfg)` once per
command and never names a model itself.

A new family is a sibling folder of qwen_image/ plus one row in FAMILIES and its rows in VERSIONS (and, if
its files say which member they are, a detector in DETECTORS)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flowtuner.errors import ConfigError

if TYPE_CHECKING:
    from flowtuner.families.base import Family


def _lazy(module: str, cls: str, *args) -> Callable[[], Family]:
    # the family's module imports torch and its model code: only when a command needs it
    return lambda: getattr(importlib.import_module(module), cls)(*args)


_EDIT = "flowtuner.families.qwen_image.edit_family"
# family name -> factory
FAMILIES: dict[str, Callable[[], Family]] = {
    "qwen_image": _lazy("flowtuner.families.qwen_image", "QwenImageFamily"),
    "qwen_image_edit": _lazy(_EDIT, "QwenImageEditFamily", "edit"),
    "qwen_image_edit_2509": _lazy(_EDIT, "QwenImageEditFamily", "edit-2509"),
    "qwen_image_edit_2511": _lazy(_EDIT, "QwenImageEditFamily", "edit-2511"),
    "sdxl": _lazy("flowtuner.families.sdxl.family", "SDXLFamily"),
}


@dataclass(frozen=True)
class Version:
    """One --model_version value: the model it names and the family that runs it (None: a value musubi-tuner
    accepts that flowtuner cannot run yet, refused in one line)."""

    model: str
    family: str | None = None
    missing: str = ""  # why it cannot run, for the refusal


# --model_version value (musubi-tuner's names) -> model
VERSIONS: dict[str, Version] = {
    "original": Version("Qwen-Image", "qwen_image"),
    "edit": Version("Qwen-Image-Edit", "qwen_image_edit"),
    "edit-2509": Version("Qwen-Image-Edit-2509", "qwen_image_edit_2509"),
    "edit-2511": Version("Qwen-Image-Edit-2511", "qwen_image_edit_2511"),
    "layered": Version("Qwen-Image-Layered"),
    "sdxl": Version("SDXL", "sdxl"),
}
#: the version a command runs when neither a flag nor the files say
DEFAULT_VERSION = "original"

# modules with `detect(dit, model) -> (version or None, evidence)` and `name_hint(dit) -> version or None`: what
# model files say about the member they are (importable without torch)
DETECTORS: list[str] = ["flowtuner.families.qwen_image.detect", "flowtuner.families.sdxl.detect"]


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ConfigError(f"unknown model family {name!r}; available: {', '.join(FAMILIES)}.")
    return FAMILIES[name]()


def detect_version(dit: str | None, model: str | None) -> tuple[str | None, str]:
    """(version, evidence) from the model files where they say it unambiguously, else (None, "")."""
    for module in DETECTORS:
        version, evidence = importlib.import_module(module).detect(dit, model)
        if version is not None:
            return version, evidence
    return None, ""


def name_hints(dit: str | None) -> set[str]:
    """Versions a DiT file's name suggests (e.g. "edit" in it): only ever a warning."""
    return {v for module in DETECTORS for v in [importlib.import_module(module).name_hint(dit)] if v is not None}


def family_for(cfg) -> Family:
    """The family a parsed command configuration selects: its --model_version / --edit / --edit_plus, resolved
    by musubi-tuner's rule (a version without a family here is a one-line "not available yet" error), with the
    prediction type it runs (--prediction_type, else the family's: its training objective for a training command,
    what a plain checkpoint predicts otherwise)."""
    from flowtuner.config.models import resolve_model_version

    version = resolve_model_version(cfg)
    family = get_family(VERSIONS[version].family)
    family.prediction_type = prediction_type(cfg, family, VERSIONS[version].model)
    family.configure(cfg)
    return family


def prediction_type(cfg, family: Family, model: str) -> str:
    given = getattr(cfg, "prediction_type", None)
    if getattr(cfg, "v_parameterization", False):
        if given not in (None, "v"):
            raise ConfigError(f"--v_parameterization means --prediction_type v; drop one of them (--prediction_type {given}).")
        given = "v"
    chosen = given or (family.train_prediction_type if getattr(cfg, "trains", False) else family.prediction_types[0])
    if chosen not in family.prediction_types:
        raise ConfigError(f"--prediction_type {chosen}: {model} runs {', '.join(family.prediction_types)} only.")
    if getattr(cfg, "zero_terminal_snr", False) and chosen == "flow":
        raise ConfigError("--zero_terminal_snr rescales the DDPM table of eps / v prediction; a flow model has none "
                          "(drop it, or pass --prediction_type eps / v).")
    return chosen
