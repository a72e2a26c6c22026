"""Robust image reading: every file a user's dataset may hold becomes an 8-bit RGB image, or a clear
reason why not. The pixels are musubi-tuner's wherever that is well defined, so both tools make the
same cache from the same file:

- EXIF orientation is NOT applied (musubi-tuner does not apply it): the image is trained as stored.
  `decode` reports the orientation so the doctor can say which images viewers show rotated.
- Palette, greyscale and CMYK images are converted to RGB as musubi-tuner converts them (PIL).
- Where musubi-tuner's result is a defect, flowtuner differs and says so (`Decoded.differences`):
  transparency is composited onto white (musubi-tuner drops the alpha channel, exposing whatever
  colour the transparent pixels hold), and 16-bit values are scaled (x / 257), not clipped.
- Images over MAX_PIXELS are refused before decoding (decompression bombs).
"""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_PIXELS = 100_000_000
BACKGROUND = (255, 255, 255)
EXIF_ORIENTATION = 0x0112
ORIENTATIONS = {2: "mirrored", 3: "rotated 180°", 4: "flipped upside down", 5: "mirrored and rotated 90°",
                6: "rotated 90° clockwise", 7: "mirrored and rotated 90°", 8: "rotated 90° counter-clockwise"}


def _jpeg_xl_extensions() -> list[str]:
    """musubi-tuner lists .jxl only when a PIL JPEG-XL plugin is installed, and imports it; so does flowtuner."""
    for package, module in (("jxlpy", "jxlpy.JXLImagePlugin"), ("pillow_jxl", "pillow_jxl")):
        if find_spec(package) is not None:
            try:
                importlib.import_module(module)
            except ImportError:
                continue
            return [".jxl", ".JXL"]
    return []


# musubi-tuner's list (dataset/media_utils.py), matched as its glob matches: exact case, except where the
# platform's file names are case-insensitive (Windows); names starting with a dot are not images.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".PNG", ".JPG", ".JPEG", ".WEBP", ".BMP", ".avif",
                    ".AVIF", *_jpeg_xl_extensions())
_NORMCASE_EXTENSIONS = {os.path.normcase(ext) for ext in IMAGE_EXTENSIONS}


def is_image_name(path: Path) -> bool:
    return not path.name.startswith(".") and os.path.normcase(path.suffix) in _NORMCASE_EXTENSIONS


class ImageReadError(Exception):
    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


@dataclass(frozen=True)
class ImageInfo:
    width: int  # as stored (EXIF orientation is not applied, as in musubi-tuner)
    height: int
    orientation: int = 1  # the EXIF orientation tag, 1 = upright


@dataclass
class Decoded:
    image: Image.Image  # 8-bit RGB
    orientation: int = 1
    differences: list[str] = field(default_factory=list)  # why musubi-tuner's pixels of this file differ


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a malformed EXIF block means no usable orientation
        return 1
    return value if value in ORIENTATIONS else 1


def open_image(path: Path) -> Image.Image:
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
    """Size (as stored) and EXIF orientation from the header alone (no decoding)."""
    with open_image(path) as img:
        return ImageInfo(img.width, img.height, _orientation(img))


def to_rgb(img: Image.Image) -> tuple[Image.Image, list[str]]:
    """8-bit RGB, and the ways it differs from musubi-tuner's `convert("RGB")` / alpha drop."""
    differences = []
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        array = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(array / 257.0, 0, 255).round().astype(np.uint8), "L")
        differences.append("16-bit values scaled to 8 bits (x/257); musubi-tuner clips them at 255")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).round().astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "La", "PA", "RGBa") or (img.mode == "L" and "transparency" in img.info):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        alpha = img.getchannel("A")
        if alpha.getextrema()[0] < 255:
            differences.append("transparent pixels composited onto white; musubi-tuner drops the alpha channel")
        background = Image.new("RGB", img.size, BACKGROUND)
        background.paste(img, mask=alpha)
        return background, differences
    return (img.convert("RGB") if img.mode != "RGB" else img), differences


def decode(path: Path) -> Decoded:
    """The fully decoded image as RGB, as stored (raises ImageReadError with the reason)."""
    with open_image(path) as img:
        try:
            img.load()
            orientation = _orientation(img)
            rgb, differences = to_rgb(img)
        except (OSError, ValueError, SyntaxError) as exc:  # PIL reports truncation / corruption as these
            raise ImageReadError(path, f"corrupt or truncated ({exc})") from None
    return Decoded(rgb, orientation, differences)


def read_rgb(path: Path) -> Image.Image:
    """The fully decoded image as RGB, as stored (raises ImageReadError with the reason)."""
    return decode(path).image
