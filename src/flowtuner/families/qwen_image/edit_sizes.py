"""Image sizes for Qwen-Image-Edit, per version, as diffusers 0.42.1 and musubi-tuner compute them.

Pure functions of (width, height): no image is touched here. Sizes are (width, height) everywhere,
as PIL and both peers write them.

- diffusers `QwenImageEditPipeline` (v1): the control image is resized once to ~1024² area, sides
  rounded to multiples of 32, and that same image feeds the VL encoder and the VAE.
- diffusers `QwenImageEditPlusPipeline` (2509, 2511): per image, the VL encoder sees a 384² area and
  the VAE a 1024² area, both rounded to multiples of 32.
- musubi-tuner inference: `--resize_control_to_official_size` (1024² VAE / 384² VL in 16-px buckets),
  `--resize_control_to_image_size` (both at the output size, cover + centre crop), neither (the native
  size floored to 16). musubi resizes to these sizes by cover + centre crop (`resize_image_to_bucket`).
"""

from __future__ import annotations

import math

from flowtuner.data.buckets import area_bucket
from flowtuner.errors import ConfigError

EDIT_VERSIONS = ("edit", "edit-2509", "edit-2511")
#: diffusers CONDITION_IMAGE_SIZE / VAE_IMAGE_SIZE (pipeline_qwenimage_edit_plus.py)
VL_AREA_PLUS = 384 * 384
VAE_AREA = 1024 * 1024
#: diffusers rounds reference sizes to this multiple; the output size must be a multiple of OUTPUT_STEP
DIFFUSERS_STEP = 32
OUTPUT_STEP = 16
#: musubi-tuner's bucket step for the qie architecture and its official sizes (qwen_image_utils.py)
MUSUBI_STEP = 16
MUSUBI_VL_RESOLUTION = (384, 384)
MUSUBI_VAE_RESOLUTION = (1024, 1024)
#: how many control images each version takes (diffusers / the official models)
IMAGE_COUNTS = {"edit": (1, 1), "edit-2509": (1, 3), "edit-2511": (1, 3)}


def check_version(version: str) -> str:
    if version not in EDIT_VERSIONS:
        raise ConfigError(f"--model_version {version}: not an edit model; choose one of {', '.join(EDIT_VERSIONS)}.")
    return version


def check_image_count(version: str, count: int) -> None:
    low, high = IMAGE_COUNTS[check_version(version)]
    if not low <= count <= high:
        want = f"exactly {low}" if low == high else f"{low} to {high}"
        raise ConfigError(
            f"--model_version {version} takes {want} control image{'s' if high > 1 else ''}, got {count}; "
            + ("use edit-2509 or edit-2511 for several images." if version == "edit" and count > 1
               else "drop the extra ones." if count > high else "pass --control_image_path.")
        )


def area_size(width: int, height: int, area: int, step: int = DIFFUSERS_STEP) -> tuple[int, int]:
    """diffusers `calculate_dimensions`: the size of `area` pixels with this aspect ratio, each side
    rounded (Python's round, ties to even) to a multiple of `step`."""
    ratio = width / height
    w = math.sqrt(area * ratio)
    h = w / ratio
    return round(w / step) * step, round(h / step) * step


def vl_size(version: str, width: int, height: int) -> tuple[int, int]:
    """The size the control image is resized to before the VL processor (diffusers)."""
    return area_size(width, height, VAE_AREA if check_version(version) == "edit" else VL_AREA_PLUS)


def vae_size(version: str, width: int, height: int) -> tuple[int, int]:
    """The size the control image is resized to before the VAE (diffusers; the same for all versions)."""
    check_version(version)
    return area_size(width, height, VAE_AREA)


def default_output_size(version: str, control_sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """diffusers' default output size: 1024² area with the aspect ratio of the first (v1) or last
    (2509/2511) control image, floored to a multiple of 16."""
    width, height = control_sizes[0 if check_version(version) == "edit" else -1]
    w, h = area_size(width, height, VAE_AREA)
    return w // OUTPUT_STEP * OUTPUT_STEP, h // OUTPUT_STEP * OUTPUT_STEP


def bucket_size(width: int, height: int, resolution: tuple[int, int], step: int = MUSUBI_STEP) -> tuple[int, int]:
    """musubi-tuner `BucketSelector.calculate_bucket_resolution`: the bucket of `resolution`'s area
    closest in aspect ratio to the image, sides multiples of `step` (floored)."""
    return area_bucket(width, height, resolution, step)


def musubi_control_sizes(
    width: int, height: int, output: tuple[int, int], official: bool, to_image_size: bool
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(VAE size, VL size) of one control image in musubi-tuner's `qwen_image_generate_image.py`.
    `--resize_control_to_official_size` wins over `--resize_control_to_image_size`, as in musubi."""
    if official:
        return bucket_size(width, height, MUSUBI_VAE_RESOLUTION), bucket_size(width, height, MUSUBI_VL_RESOLUTION)
    if to_image_size:
        return tuple(output), tuple(output)
    native = bucket_size(width, height, (width, height))
    return native, native
