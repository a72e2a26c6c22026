"""Robust image reading: every file a user's dataset may hold becomes an 8-bit RGB image, or a clear
reason why not.

- EXIF orientation is applied (a portrait photo stays portrait).
- Palette, greyscale, CMYK and 16-bit images are converted to RGB; 16-bit values are scaled
  (x / 257), not clipped as PIL's own conversion does.
- Transparency is composited onto white (musubi-tuner drops the alpha channel, which exposes whatever
  colour the transparent pixels happen to hold, often black).
- Images over MAX_PIXELS are refused before decoding (decompression bombs).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".jxl", ".avif")
MAX_PIXELS = 100_000_000
BACKGROUND = (255, 255, 255)


class ImageReadError(Exception):
    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


@dataclass(frozen=True)
class ImageInfo:
    width: int  # after EXIF orientation
    height: int


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    orientation = img.getexif().get(0x0112, 1)
    w, h = img.size
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _open(path: Path) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image, or a corrupt one") from None
    except Image.DecompressionBombError:
        raise ImageReadError(path, f"too large (over {MAX_PIXELS:,} pixels)") from None
    except OSError as exc:
        raise ImageReadError(path, f"cannot open ({exc})") from None
    if img.width * img.height > MAX_PIXELS:
        raise ImageReadError(path, f"too large: {img.width}x{img.height} is over {MAX_PIXELS:,} pixels")
    return img


def read_info(path: Path) -> ImageInfo:
    """Size from the header alone (no decoding)."""
    with _open(path) as img:
        return ImageInfo(*_oriented_size(img))


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        array = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(array / 257.0, 0, 255).round().astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).round().astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "La", "PA", "RGBa") or (img.mode == "L" and "transparency" in img.info):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGB", img.size, BACKGROUND)
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB") if img.mode != "RGB" else img


def read_rgb(path: Path) -> Image.Image:
    """The fully decoded image as RGB (raises ImageReadError with the reason)."""
    with _open(path) as img:
        try:
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
        except (OSError, ValueError, SyntaxError) as exc:  # PIL reports truncation / corruption as these
            raise ImageReadError(path, f"corrupt or truncated ({exc})") from None
