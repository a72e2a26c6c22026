"""musubi-tuner's prompt-line syntax: `a cat --w 512 --h 512 --d 42 --s 20 --l 4.0 --n blurry --fs 3`, plus
`--NAME VALUE` for every sampling option of `flowtuner generate` (`--sampler heun --guidance apg:eta=0.5`)
and `--image` / `--mask` / `--strength`; `--ci PATH` (repeatable) gives an edit model's control images. A repeatable option (`--guidance`) given on a line replaces the
command line's list for that line."""

from __future__ import annotations

import typing
from dataclasses import fields
from pathlib import Path

from flowtuner.config.sampling import SamplingConfig
from flowtuner.errors import ConfigError

# musubi-tuner's short options -> (job field, type)
SHORT_OPTIONS: dict[str, tuple[str, type]] = {
    "w": ("width", int), "h": ("height", int), "d": ("seed", int), "s": ("steps", int),
    "g": ("guidance_scale", float), "l": ("guidance_scale", float), "n": ("negative_prompt", str),
    "fs": ("flow_shift", float), "ci": ("control_images", str),
}
REPEATABLE = {"guidance", "control_images"}


def _field_type(tp) -> type:
    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    base = args[0]
    return typing.get_args(base)[0] if typing.get_origin(base) is list else base


def inline_options() -> dict[str, tuple[str, type]]:
    hints = typing.get_type_hints(SamplingConfig)
    named = {f.name: (f.name, _field_type(hints[f.name])) for f in fields(SamplingConfig)}
    return {**SHORT_OPTIONS, **named, "image": ("image", str), "mask": ("mask", str), "strength": ("strength", float)}


def parse_prompt_line(line: str, where: str = "") -> tuple[str, dict]:
    """(prompt, {field: value}) from one line. Raises ConfigError naming `where` on a bad option."""
    options = inline_options()
    text = " " + line.strip()
    parts = text.split(" --")
    prompt, overrides = parts[0].strip(), {}
    for part in parts[1:]:
        key, _, value = part.strip().partition(" ")
        key = key.replace("-", "_")
        if key not in options:
            raise ConfigError(f"{where}unknown option --{key}; valid: {', '.join('--' + k for k in options)}.")
        name, typ = options[key]
        try:
            parsed = typ(value.strip()) if typ is not str else value.strip()
        except ValueError:
            raise ConfigError(f"{where}--{key} needs a {typ.__name__}, got {value.strip()!r}.") from None
        if name in REPEATABLE:
            overrides[name] = [*overrides.get(name, []), parsed]
        else:
            overrides[name] = parsed
    return prompt, overrides


def read_prompt_file(path: str | Path) -> list[tuple[str, dict]]:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read prompt file ({exc.strerror}).") from None
    out = []
    for number, line in enumerate(lines, 1):
        if line.strip() and not line.lstrip().startswith("#"):
            out.append(parse_prompt_line(line, f"{path}:{number}: "))
    if not out:
        raise ConfigError(f"{path}: no prompts in the file.")
    return out
