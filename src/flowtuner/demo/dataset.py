"""Procedural images: one coloured shape on a plain background, captioned with both colours."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

SHAPE_COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")


def caption(color: str, shape: str, background: str) -> str:
    return f"a {color} {shape} on a {background} background"


def edit_caption(shape: str, color: str) -> str:
    return f"make the {shape} {color}"


def draw_shape(size: int, color: str, shape: str, background: str, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.22, 0.34) * size
    cx, cy = size / 2 + rng.uniform(-0.1, 0.1) * size, size / 2 + rng.uniform(-0.1, 0.1) * size
    fill = SHAPE_COLORS[color]
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    return img


def combinations() -> list[tuple[str, str, str]]:
    return [(c, s, b) for c in SHAPE_COLORS for s in SHAPES for b in BACKGROUNDS]


def write_dataset(folder: Path, size: int, per_combination: int, seed: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    captions = []
    for c, s, b in combinations():
        for k in range(per_combination):
            stem = f"{c}_{s}_{b}_{k:02d}"
            draw_shape(size, c, s, b, rng).save(folder / f"{stem}.png")
            (folder / f"{stem}.txt").write_text(caption(c, s, b))
            captions.append(caption(c, s, b))
    return captions


def edit_combinations() -> list[tuple[str, str, str, str]]:
    """(colour before, colour after, shape, background), the two colours different."""
    return [(a, b, s, g) for a in SHAPE_COLORS for b in SHAPE_COLORS if a != b for s in SHAPES for g in BACKGROUNDS]


def draw_pair(size: int, before: str, after: str, shape: str, background: str, seed: int) -> tuple[Image.Image, Image.Image]:
    """The same shape at the same place and size, in two colours: (control, target)."""
    return (draw_shape(size, before, shape, background, random.Random(seed)),
            draw_shape(size, after, shape, background, random.Random(seed)))


def write_edit_dataset(folder: Path, controls: Path, size: int, per_combination: int, seed: int) -> list[str]:
    """Targets in `folder` with captions "make the <shape> <colour>", each control (the same shape in another
    colour) under the same name in `controls`."""
    folder.mkdir(parents=True, exist_ok=True)
    controls.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    captions = []
    for a, b, s, g in edit_combinations():
        for k in range(per_combination):
            stem = f"{a}_to_{b}_{s}_{g}_{k:02d}"
            control, target = draw_pair(size, a, b, s, g, rng.randrange(2**31))
            control.save(controls / f"{stem}.png")
            target.save(folder / f"{stem}.png")
            (folder / f"{stem}.txt").write_text(edit_caption(s, b))
            captions.append(edit_caption(s, b))
    return captions


def classify(image: Image.Image) -> str | None:
    """The shape colour that covers most of the non-background pixels (each pixel takes the nearest of the
    palette's colours), or None when no pixel is closer to a shape colour than to a background."""
    palette = {**SHAPE_COLORS, **{f"bg:{k}": v for k, v in BACKGROUNDS.items()}}
    counts = dict.fromkeys(SHAPE_COLORS, 0)
    for r, g, b in image.convert("RGB").getdata():
        name = min(palette, key=lambda k: (palette[k][0] - r) ** 2 + (palette[k][1] - g) ** 2 + (palette[k][2] - b) ** 2)
        if name in counts:
            counts[name] += 1
    best = max(counts, key=counts.get)
    return best if counts[best] else None
