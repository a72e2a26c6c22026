"""musubi-tuner's prompt-line syntax: `a cat --w 512 --h 512 --d 42 --s 20 --l 4.0 --n blurry --fs 3`."""

from __future__ import annotations

from pathlib import Path

from flowtuner.errors import ConfigError

# inline option -> (config field, type)
INLINE_OPTIONS: dict[str, tuple[str, type]] = {
    "w": ("width", int), "h": ("height", int), "d": ("seed", int), "s": ("steps", int),
    "g": ("guidance_scale", float), "l": ("guidance_scale", float), "n": ("negative_prompt", str),
    "fs": ("flow_shift", float), "sampler": ("sampler", str), "scheduler": ("scheduler", str), "shift": ("shift", float),
}


def parse_prompt_line(line: str, where: str = "") -> tuple[str, dict]:
    """(prompt, {field: value}) from one line. Raises ConfigError naming `where` on a bad option."""
    text = " " + line.strip()
    parts = text.split(" --")
    prompt, overrides = parts[0].strip(), {}
    for part in parts[1:]:
        key, _, value = part.strip().partition(" ")
        if key not in INLINE_OPTIONS:
            raise ConfigError(f"{where}unknown option --{key}; valid: {', '.join('--' + k for k in INLINE_OPTIONS)}.")
        name, typ = INLINE_OPTIONS[key]
        try:
            overrides[name] = typ(value.strip()) if typ is not str else value.strip()
        except ValueError:
            raise ConfigError(f"{where}--{key} needs a {typ.__name__}, got {value.strip()!r}.") from None
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
