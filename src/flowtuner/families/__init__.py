"""Model families: the only code that knows a model. A registry: shared code asks `family_for(cfg)` once per
command and never names a model itself."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from flowtuner.errors import ConfigError

if TYPE_CHECKING:
    from flowtuner.families.base import Family


def _lazy(module: str, cls: str) -> Callable[[], Family]:
    # the family's module imports torch and its model code: only when a command needs it
    return lambda: getattr(importlib.import_module(module), cls)()


# family name -> factory
FAMILIES: dict[str, Callable[[], Family]] = {
    "qwen_image": _lazy("flowtuner.families.qwen_image", "QwenImageFamily"),
}

# --model_version value (after musubi-tuner's resolution rule, config.models.resolve_model_version) -> family
# name; a version listed in config.models.MODEL_VERSIONS but not here is "not available yet"
VERSIONS: dict[str, str] = {
    "original": "qwen_image",
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ConfigError(f"unknown model family {name!r}; available: {', '.join(FAMILIES)}.")
    return FAMILIES[name]()


def family_for(cfg) -> Family:
    """The family a parsed command configuration selects: its --model_version / --edit / --edit_plus, resolved
    by musubi-tuner's rule (a version without a family here is a one-line "not available yet" error)."""
    from flowtuner.config.models import resolve_model_version

    return get_family(VERSIONS[resolve_model_version(cfg)])
