"""Robust image reading (a zoo of odd and broken files) and musubi-tuner's bucket rule."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from flowtuner.data import images
from flowtuner.data.buckets import BucketSelector, resize_to_bucket
from flowtuner.data.images import ImageReadError, read_info, read_rgb
from tests.datasets import noise_image, truncated_jpeg


def _exif_rotated(path):
    img = noise_image(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    img.save(path, exif=exif)
    return path


def test_exif_orientation_reported_not_applied(tmp_path):
    """musubi-tuner trains the pixels as stored (and names the cache after the stored size): so does flowtuner."""
    path = _exif_rotated(tmp_path / "r.jpg")
    info = read_info(path)
    assert (info.width, info.height, info.orientation) == (40, 20, 6)
    decoded = images.decode(path)
    assert decoded.image.size == (40, 20) and decoded.orientation == 6 and decoded.differences == []
    np.testing.assert_array_equal(np.asarray(decoded.image), np.asarray(Image.open(path).convert("RGB")))


def test_modes_become_rgb(tmp_path):
    p = tmp_path
    Image.new("L", (8, 8), 100).save(p / "grey.png")
    Image.new("LA", (8, 8), (100, 0)).save(p / "la.png")
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(p / "cmyk.jpg")
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.save(p / "pal.png", transparency=1)
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(p / "rgba.png")
    Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16)).save(p / "sixteen.png")
    expected = {"grey.png": (100, 100, 100), "la.png": (255, 255, 255), "pal.png": (255, 255, 255),
                "rgba.png": (255, 255, 255), "sixteen.png": (128, 128, 128)}
    for name, rgb in expected.items():
        img = read_rgb(p / name)
        assert img.mode == "RGB" and img.getpixel((3, 3)) == rgb, name
    differs = {name: images.decode(p / name).differences for name in expected}
    assert [name for name, d in differs.items() if d] == ["la.png", "pal.png", "rgba.png", "sixteen.png"]
    assert "musubi-tuner drops the alpha channel" in differs["rgba.png"][0] and "clips" in differs["sixteen.png"][0]
    Image.new("RGBA", (8, 8), (255, 0, 0, 255)).save(p / "opaque.png")  # alpha present but unused: same as musubi
    assert images.decode(p / "opaque.png").differences == []
    cmyk = read_rgb(p / "cmyk.jpg")
    assert cmyk.mode == "RGB" and cmyk.getpixel((3, 3))[0] > 200 and cmyk.getpixel((3, 3))[1] < 60


def test_broken_files_have_reasons(tmp_path, monkeypatch):
    (tmp_path / "trunc.jpg").write_bytes(truncated_jpeg())
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    noise_image(64, 64).save(tmp_path / "big.png")
    cases = {"trunc.jpg": "corrupt or truncated", "zero.png": "not an image", "text.png": "not an image",
             "missing.png": "file not found"}
    for name, reason in cases.items():
        with pytest.raises(ImageReadError, match=reason):
            read_rgb(tmp_path / name)
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    with pytest.raises(ImageReadError, match="too large: 64x64"):
        read_info(tmp_path / "big.png")


def test_bucket_rule_matches_musubi():
    small = BucketSelector((64, 64), True, False, 16)
    assert small.buckets == [(32, 128), (48, 80), (64, 64), (80, 48), (128, 32)]
    big = BucketSelector((1024, 1024), True, False, 16)
    assert big.select(1920, 1080) == (1360, 768)  # musubi floors to 16 px (diffusers would give 1376x768)
    assert big.select(1080, 1920) == (768, 1360)
    assert big.select(1000, 1000) == (1024, 1024)
    assert all(w % 16 == 0 and h % 16 == 0 and w * h <= 1024 * 1024 for w, h in big.buckets)
    assert BucketSelector((1024, 1024), False, False, 16).select(1920, 1080) == (1024, 1024)
    no_up = BucketSelector((1024, 1024), True, True, 16)
    assert no_up.select(500, 333) == (496, 320) and no_up.select(1920, 1080) == (1360, 768)
    assert BucketSelector((1024, 1024), True, False, 64).select(1920, 1080)[0] % 64 == 0  # SDXL-style step


def test_resize_covers_then_centre_crops():
    img = Image.new("RGB", (1920, 1080))
    img.paste((255, 0, 0), (0, 0, 2, 1080))  # a red stripe at the far left is cropped away
    out = resize_to_bucket(img, (1360, 768))
    assert out.shape == (768, 1360, 3) and out.dtype == np.uint8
    assert out[400, 0, 0] < 128
    tall = resize_to_bucket(noise_image(30, 40), (64, 64))  # upscaled with Lanczos
    assert tall.shape == (64, 64, 3)
    np.testing.assert_array_equal(tall, np.asarray(noise_image(30, 40).resize((64, 85), Image.Resampling.LANCZOS))[10:74])


def test_shrinking_is_opencv_area_not_pil_box():
    """At a non-integer scale PIL's BOX is not INTER_AREA: on line art they differ by many levels."""
    import cv2
    from PIL import ImageDraw

    img = Image.new("L", (301, 211), 255)
    draw = ImageDraw.Draw(img)
    for x in range(0, 301, 5):
        draw.line((x, 0, 300 - x, 210), fill=0)
    out = resize_to_bucket(img, (208, 144))  # scale 0.691: 208x146, cropped by one row top and bottom
    np.testing.assert_array_equal(out, cv2.resize(np.asarray(img), (208, 146), interpolation=cv2.INTER_AREA)[1:145])
    box = np.asarray(img.resize((208, 146), Image.Resampling.BOX))[1:145]
    assert np.abs(out.astype(int) - box).max() > 20


def test_image_extensions_are_musubis(tmp_path):
    """musubi-tuner's list and case rule: .gif / .tif / .Png are not read (each reported), dot files neither."""
    from flowtuner.data.sources import _images_in, _skipped_images

    for name in ("a.png", "b.JPG", "c.jpeg", "d.webp", "e.bmp", "f.avif", "g.gif", "h.tif", "i.Png", ".hidden.png", "j.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in _images_in(tmp_path)] == ["a.png", "b.JPG", "c.jpeg", "d.webp", "e.bmp", "f.avif"]
    assert [p.path.name for p in _skipped_images(tmp_path)] == ["g.gif", "h.tif", "i.Png"]
    assert set(images.IMAGE_EXTENSIONS) >= {".png", ".PNG", ".jpg", ".JPG", ".jpeg", ".JPEG", ".webp", ".WEBP", ".bmp", ".BMP",
                                            ".avif", ".AVIF"}
