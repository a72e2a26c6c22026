"""Control images of edit datasets: which of an item's controls the model reads, how each is read, and the
size it is cached at. musubi-tuner's rules (its ImageDataset caching), so both tools make the same caches:

- size (`control_size`): by default each control is resized and centre-cropped to the target's bucket;
  `control_resolution` alone buckets it to that area (calculate_bucket_resolution); `no_resize_control`
  alone keeps its native size floored to the size step; both keep the native size (floored) up to
  control_resolution's area and bucket larger ones to it. musubi-tuner does not floor in that last case;
  flowtuner does, because the model packs latents in 2x2 patches (docs/datasets.md);
- pixels (`control_pixels`): the targets' resize path (cover + centre crop, Lanczos up, INTER_AREA down).
  An alpha channel is dropped, as musubi-tuner and ComfyUI drop it and as `generate` reads control images
  (targets are composited onto white instead); 16-bit values are scaled as for targets;
- count (`plan_controls`): a model that reads no control image ignores them (one warning per dataset); one
  that reads one uses the first and ignores the rest (musubi-tuner's edit text encoder does the same, one
  warning per dataset); more than a model taking several reads is an error naming the item.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from flowtuner.data.buckets import area_bucket, floor_to, resize_to_bucket
from flowtuner.data.config import Dataset
from flowtuner.data.images import ImageReadError, open_image, to_rgb
from flowtuner.data.sources import Item

HIGH_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")
ALPHA_MODES = ("RGBA", "LA", "La", "PA", "RGBa")


@dataclass
class ControlPlan:
    """The controls each item's caches are made from, items refused, and dataset-wide warnings."""

    controls: dict[str, list[Path]] = field(default_factory=dict)  # item key -> controls the model reads
    refused: dict[str, str] = field(default_factory=dict)  # item key -> why it cannot be cached
    warnings: list[str] = field(default_factory=list)  # one line per decision for the whole dataset


def plan_controls(items: list[Item], max_controls: int) -> ControlPlan:
    plan = ControlPlan()
    with_controls = [it for it in items if it.controls]
    if max_controls == 0:
        if with_controls:
            plan.warnings.append(f"{len(with_controls)} items have control images (e.g. "
                                 f"{with_controls[0].controls[0]}); this model takes none: they are ignored, as "
                                 "musubi-tuner's text-to-image caching ignores them")
        return plan
    extra = [it for it in with_controls if len(it.controls) > max_controls]
    for item in items:
        plan.controls[item.key] = item.controls[:max_controls]
    if extra and max_controls == 1:
        plan.warnings.append(f"{len(extra)} items have more than one control image (e.g. {extra[0].image}); "
                             "this model reads one: the first is used and the others ignored, as musubi-tuner does")
    elif extra:
        for item in extra:
            plan.refused[item.key] = (f"{len(item.controls)} control images, but this model takes at most {max_controls}; "
                                      f"remove {', '.join(p.name for p in item.controls[max_controls:])}")
    return plan


def control_rule(ds: Dataset) -> str:
    """The dataset's sizing rule in words: part of the caches' provenance."""
    res = ds.control_resolution
    if ds.no_resize_control:
        return "native" if res is None else f"native-up-to-{res[0]}x{res[1]}"
    return "target-bucket" if res is None else f"area-{res[0]}x{res[1]}"


def control_size(ds: Dataset, bucket: tuple[int, int], size: tuple[int, int], step: int) -> tuple[int, int]:
    """The (W, H) a control image of `size` is cached at, for a target in `bucket`."""
    width, height = size
    res = ds.control_resolution
    if ds.no_resize_control:
        if res is not None and width * height > res[0] * res[1]:
            return area_bucket(width, height, res, step)
        return floor_to(width, step), floor_to(height, step)
    if res is not None:
        return area_bucket(width, height, res, step)
    return tuple(bucket)


@dataclass
class DecodedControl:
    image: Image.Image  # 8-bit RGB
    notes: list[str] = field(default_factory=list)  # warnings: how the file's pixels were changed to be read


def _has_transparency(img: Image.Image) -> bool:
    if img.mode not in ALPHA_MODES and "transparency" not in img.info:
        return False
    return img.convert("RGBA").getchannel("A").getextrema()[0] < 255


def decode_control(path: Path) -> DecodedControl:
    """The control image as 8-bit RGB, as stored (raises ImageReadError with the reason)."""
    with open_image(path) as img:
        try:
            img.load()
            notes = []
            if img.mode in HIGH_BIT_MODES:
                rgb, differences = to_rgb(img)
                notes += [f"{img.mode} (16-bit or float): " + d for d in differences]
            else:
                if _has_transparency(img):
                    notes.append("has transparent pixels: the alpha channel is dropped and the colours under it are used "
                                 "(as musubi-tuner and generate read control images)")
                if img.mode == "CMYK":
                    notes.append("CMYK: converted to RGB without a colour profile (as musubi-tuner converts it); "
                                 "colours may differ from what viewers show")
                rgb = img.convert("RGB")
        except (OSError, ValueError, SyntaxError) as exc:  # PIL reports truncation / corruption as these
            raise ImageReadError(path, f"corrupt or truncated ({exc})") from None
    return DecodedControl(rgb, notes)


def control_pixels(path: Path, size: tuple[int, int]) -> np.ndarray:
    """The control image resized and cropped to `size` (W, H): [H, W, 3] uint8."""
    return resize_to_bucket(decode_control(path).image, size)
