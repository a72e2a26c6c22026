"""Aspect-ratio buckets, as musubi-tuner builds them (so the same images land in the same buckets):
equal-area sizes in `step`-pixel increments, the nearest aspect ratio wins, images are resized to
cover the bucket and centre-cropped. The step comes from the model family (16 for Qwen-Image)."""

from __future__ import annotations

import math

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


def upscale_factor(width: int, height: int, bucket: tuple[int, int]) -> float:
    return max(bucket[0] / width, bucket[1] / height)


def resize_to_bucket(img: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Cover the bucket (Lanczos when enlarging, area averaging when shrinking), then centre-crop.

    musubi-tuner shrinks with OpenCV's INTER_AREA; PIL's BOX filter is the same area average, so
    pixels may differ by rounding only."""
    bw, bh = bucket
    scale = upscale_factor(img.width, img.height, bucket)
    size = (int(img.width * scale + 0.5), int(img.height * scale + 0.5))
    if size != img.size:
        img = img.resize(size, Image.Resampling.LANCZOS if scale > 1 else Image.Resampling.BOX)
    left, top = (img.width - bw) // 2, (img.height - bh) // 2
    return img.crop((left, top, left + bw, top + bh))
