"""Build small datasets on disk for the data-layer tests, including a zoo of broken inputs."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def noise_image(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode)


def line_drawing(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Text and one-pixel lines on white: where resampling filters disagree most (hard edges, fine detail).
    RGBA gets a varying alpha; P a 64-colour palette."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for _ in range(max(4, (w + h) // 6)):
        x0, x1 = rng.integers(0, w, 2)
        y0, y1 = rng.integers(0, h, 2)
        draw.line((int(x0), int(y0), int(x1), int(y1)), fill=tuple(int(c) for c in rng.integers(0, 256, 3)), width=1)
    for y in range(2, h, 13):
        draw.text((int(rng.integers(0, max(1, w // 4))), y), "Flow 0123 quick fox", fill=(0, 0, 0))
    if mode == "RGBA":
        alpha = Image.linear_gradient("L").resize((w, h)).point(lambda v: 255 - v // 2)  # 128..255
        img = img.convert("RGBA")
        img.putalpha(alpha)
        return img
    if mode == "P":
        return img.quantize(64)
    return img.convert(mode)


def write_item(folder: Path, stem: str, image: Image.Image, caption: str | None, suffix: str = ".png") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}{suffix}"
    image.save(path)
    if caption is not None:
        (folder / f"{stem}.txt").write_text(caption)
    return path


def write_config(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


def good_dataset(root: Path, sizes=((64, 64), (96, 64), (64, 96), (80, 80))) -> Path:
    images = root / "images"
    for i, (w, h) in enumerate(sizes):
        write_item(images, f"img{i}", noise_image(w, h, i), f"caption number {i}")
    return write_config(root / "dataset.toml", f"""
[general]
resolution = [64, 64]
caption_extension = ".txt"
enable_bucket = true
batch_size = 2

[[datasets]]
image_directory = "{images}"
cache_directory = "{root / 'cache'}"
""")


def truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    noise_image(64, 64).save(buf, format="JPEG")
    data = buf.getvalue()
    return data[: len(data) // 2]
