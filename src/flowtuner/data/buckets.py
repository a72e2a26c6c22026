"""Aspect-ratio buckets, as musubi-tuner builds them (so the same images land in the same buckets):
equal-area sizes in `step`-pixel increments, the nearest aspect ratio wins, images are resized to
cover the bucket and centre-cropped, with musubi-tuner's filters and rounding (same pixels). The step
comes from the model family (16 for Qwen-Image)."""

from __future__ import annotations

import math

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
