"""Aspect-ratio buckets, as musubi-tuner builds them (so the same images land in the same buckets):
equal-area sizes in `step`-pixel increments, the nearest aspect ratio wins, images are resized to
cover the bucket and centre-cropped, with musubi-tuner's filters and rounding (same pixels). The step
comes from the model family (16 for Qwen-Image).

Other rules (`bucket_rule` in the dataset config, BUCKET_RULES) keep a fixed list of sizes instead; they
record where each image was cropped (SDXL's micro-conditioning reads it back from the latent cache)."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image


def floor_to(value: int, step: int) -> int:
    return (value // step) * step


class BucketSelector:
    def __init__(self, resolution: tuple[int, int], enable_bucket: bool, no_upscale: bool, step: int):
        self.resolution, self.step = resolution, step
        self.enable_bucket, self.no_upscale = enable_bucket, no_upscale and enable_bucket
        self.area = resolution[0] * resolution[1]
        self.buckets = self._buckets() if enable_bucket else [resolution]
        self.ratios = [w / h for w, h in self.buckets]

    def _buckets(self) -> list[tuple[int, int]]:
        sqrt_size = int(math.sqrt(self.area))
        min_size = floor_to(sqrt_size // 2, self.step)
        found = set()
        for w in range(min_size, sqrt_size + self.step, self.step):
            h = floor_to(self.area // w, self.step)
            found.update({(w, h), (h, w)})
        return sorted(found)

    def select(self, width: int, height: int) -> tuple[int, int]:
        """The (W, H) bucket for an image of width x height."""
        if not self.enable_bucket:
            return self.resolution
        if self.no_upscale and width * height <= self.area:
            return (floor_to(width, self.step), floor_to(height, self.step))
        ratio = width / height
        errors = [abs(r - ratio) for r in self.ratios]
        return self.buckets[errors.index(min(errors))]

    #: musubi-tuner's caches record no crop: the latent cache stays in its format
    records_geometry = False

    def record(self) -> dict:
        """What a latent cache's provenance adds for this rule ({}: musubi-tuner's rule, the caches' old record)."""
        return {}

    def place(self, image, bucket: tuple[int, int], key: str) -> tuple[np.ndarray, tuple[int, int]]:
        """(pixels [H, W, 3] in the bucket, (left, top) cropped off the resized image)."""
        width, height = image.size if isinstance(image, Image.Image) else image.shape[1::-1]
        return resize_to_bucket(image, bucket), centre_crop(cover_size(width, height, bucket), bucket)


def area_bucket(width: int, height: int, resolution: tuple[int, int], step: int) -> tuple[int, int]:
    """musubi-tuner's `BucketSelector.calculate_bucket_resolution`: the (W, H) of `resolution`'s area nearest
    to the image's aspect ratio, sides floored to `step`, searched among five widths around the ideal one
    (what edit datasets resize control images to under `control_resolution`)."""
    area, ratio = resolution[0] * resolution[1], width / height
    base_w = floor_to(int(math.sqrt(area * ratio)), step)
    base = (base_w, floor_to(int(math.sqrt(area / ratio)), step))
    best, best_diff = None, float("inf")
    for i in range(-2, 3):
        w = base_w + i * step
        h = floor_to(area // w, step) if w > 0 else 0
        if h <= 0:  # musubi-tuner divides by zero here; such an area holds no bucket of this width
            continue
        diff = abs(w / h - ratio)
        if diff < best_diff:
            best, best_diff = (w, h), diff
    return best or base


@dataclass(frozen=True)
class RangeRule:
    """Every (W, H) on a `step` grid with both sides in [min_side, max_side], the area in [min_area, max_area] and
    the aspect ratio within [1/max_ratio, max_ratio]."""

    min_side: int
    max_side: int
    step: int
    min_area: int
    max_area: int
    max_ratio: float
    doc: str

    def buckets(self) -> list[tuple[int, int]]:
        sides = range(self.min_side, self.max_side + 1, self.step)
        return [(w, h) for w in sides for h in sides
                if self.min_area <= w * h <= self.max_area and h <= self.max_ratio * w and w <= self.max_ratio * h]


BUCKET_RULES = {
    "bigasp": RangeRule(512, 2048, 64, 946_176, 1_048_576, 3.0,
                        "bigASP v2.5's 31 SDXL buckets: 64-px sides 512..2048, area 946,176..1,048,576, aspect 1/3..3"),
}
MUSUBI_RULE = "musubi"
CROPS = ("center", "random")


def cover_size(width: int, height: int, bucket: tuple[int, int]) -> tuple[int, int]:
    """The size that covers the bucket at scale max(bw/w, bh/h), rounded half up (never under the bucket)."""
    scale = max(bucket[0] / width, bucket[1] / height)
    return max(bucket[0], int(width * scale + 0.5)), max(bucket[1], int(height * scale + 0.5))


def centre_crop(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    return (size[0] - bucket[0]) // 2, (size[1] - bucket[1]) // 2


def random_crop(size: tuple[int, int], bucket: tuple[int, int], key: str) -> tuple[int, int]:
    """A crop offset drawn per item from its key: random across items, the same at every caching run (a cache
    holds one crop, as the recipe's pre-encoded latents do)."""
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))
    return int(rng.integers(0, size[0] - bucket[0] + 1)), int(rng.integers(0, size[1] - bucket[1] + 1))


class RuleSelector:
    """A fixed bucket list: the bucket of the closest aspect ratio (the first of equals), the image scaled by
    max(bw/w, bh/h) with PIL's Lanczos (up and down, as the recipe resizes) and cropped to the bucket."""

    records_geometry = True

    def __init__(self, name: str, crop: str = "center"):
        self.name, self.crop = name, crop
        self.buckets = BUCKET_RULES[name].buckets()
        self.ratios = [w / h for w, h in self.buckets]

    def select(self, width: int, height: int) -> tuple[int, int]:
        ratio = width / height
        errors = [abs(r - ratio) for r in self.ratios]
        return self.buckets[errors.index(min(errors))]

    def record(self) -> dict:
        return {"bucket_rule": self.name, "crop": self.crop}

    def place(self, image, bucket: tuple[int, int], key: str) -> tuple[np.ndarray, tuple[int, int]]:
        pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
        size = cover_size(pil.width, pil.height, bucket)
        left, top = centre_crop(size, bucket) if self.crop == "center" else random_crop(size, bucket, key)
        resized = pil if size == pil.size else pil.resize(size, Image.Resampling.LANCZOS)
        return np.ascontiguousarray(np.asarray(resized)[top : top + bucket[1], left : left + bucket[0]]), (left, top)


def bucket_selector(ds, step: int) -> BucketSelector | RuleSelector:
    """The bucket rule of a dataset (data.config.Dataset): musubi-tuner's unless `bucket_rule` names another."""
    if ds.bucket_rule == MUSUBI_RULE:
        return BucketSelector(ds.resolution, ds.enable_bucket, ds.bucket_no_upscale, step)
    return RuleSelector(ds.bucket_rule, ds.bucket_crop)


def upscale_factor(width: int, height: int, bucket: tuple[int, int]) -> float:
    return max(bucket[0] / width, bucket[1] / height)


def resize_to_bucket(image: Image.Image | np.ndarray, bucket: tuple[int, int]) -> np.ndarray:
    """The image resized to cover the (W, H) bucket, then centre-cropped: an [H, W(, C)] uint8 array with
    musubi-tuner's pixels (its `resize_image_to_bucket`), for a PIL image of any mode or an array.

    Enlarging uses PIL's Lanczos, shrinking OpenCV's INTER_AREA: PIL's BOX filter is not the same
    average at non-integer scales (measured: up to 142 levels apart on line art). The scaled size is rounded
    half up, and the crop offset floored, as musubi-tuner does."""
    if isinstance(image, Image.Image):
        width, height = image.size
    else:
        height, width = image.shape[:2]
    if (width, height) == tuple(bucket):
        return np.array(image)
    scale = max(bucket[0] / width, bucket[1] / height)
    size = (int(width * scale + 0.5), int(height * scale + 0.5))
    if scale > 1:
        pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
        resized = np.asarray(pil.resize(size, Image.Resampling.LANCZOS))
    else:
        resized = cv2.resize(np.asarray(image), size, interpolation=cv2.INTER_AREA)
    left, top = (size[0] - bucket[0]) // 2, (size[1] - bucket[1]) // 2
    return np.ascontiguousarray(resized[top : top + bucket[1], left : left + bucket[0]])
