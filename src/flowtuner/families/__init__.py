"""Model families: the only code that knows a model. Registered by name."""

from __future__ import annotations

from flowtuner.errors import ConfigError
from flowtuner.families.base import Family


def get_family(name: str) -> Family:
    from flowtuner.families.qwen_image import QwenImageFamily

    families = {"qwen_image": QwenImageFamily}
    if name not in families:
        raise ConfigError(f"unknown model family {name!r}; available: {', '.join(families)}.")
    return families[name]()
