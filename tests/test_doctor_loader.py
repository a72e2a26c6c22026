"""The dataset doctor and the training loader over caches."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from flowtuner.cli import main
from flowtuner.data.config import load_dataset_config
from flowtuner.data.loader import BatchPlan, CacheDataset, CacheError, make_loader, scan_caches
from flowtuner.families.qwen_image import QwenImageFamily
from tests.datasets import good_dataset, noise_image, truncated_jpeg, write_config, write_item


def test_doctor_reports_everything(tmp_path, capsys):
    images, controls = tmp_path / "images", tmp_path / "controls"
    for i in range(3):
        write_item(images, f"ok{i}", noise_image(64 + 16 * i, 64, i), f"caption {i}")
    write_item(images, "tiny", noise_image(20, 20, 7), "small")
    write_item(images, "copy", noise_image(64, 64, 0), "same pixels as ok0")
    write_item(images, "nocap", noise_image(64, 64, 3), None)
    (images / "trunc.jpg").write_bytes(truncated_jpeg())
    (images / "trunc.txt").write_text("x")
    write_item(controls, "ok0", noise_image(64, 64), None)
    write_item(controls, "ok0_1", noise_image(64, 64), None)
    write_item(controls, "stranger", noise_image(64, 64), None)
    cfg = write_config(tmp_path / "d.toml", f"""
[general]
resolution = 64
enable_bucket = true
[[datasets]]
image_directory = "{images}"
control_directory = "{controls}"
num_repeats = 2
""")
    preview = tmp_path / "preview"
    assert main(["dataset", "check", "--dataset_config", str(cfg), "--preview", str(preview)]) == 1
    out = capsys.readouterr().out
    assert "7 items, 6 readable, x2 repeats" in out
    assert "64x64" in out and "bucket histogram" in out and "estimated cache size" in out
    for text in ("nocap.png: no caption file", "trunc.jpg: corrupt or truncated", "tiny.png: 20x20 is enlarged 3.2x",
                 "ok0.png: same content as", "ok1.png: no control image", "stranger.png: control image without a matching target",
                 "2 errors"):
        assert text in out, text
    sheets = list(preview.glob("*.png"))
    assert len(sheets) == 1 and Image.open(sheets[0]).size[0] > 0


def test_doctor_says_which_images_musubi_reads_differently(tmp_path, capsys):
    images = tmp_path / "images"
    exif = Image.Exif()
    exif[0x0112] = 8
    write_item(images, "turned", noise_image(48, 32), "a", suffix=".jpg").unlink()
    noise_image(48, 32).save(images / "turned.jpg", exif=exif)
    write_item(images, "clear", Image.new("RGBA", (32, 32), (9, 9, 9, 0)), "b")
    write_item(images, "plain", noise_image(32, 32), "c")
    write_item(images, "anim", noise_image(32, 32), "d", suffix=".gif")
    cfg = write_config(tmp_path / "d.toml", f'[[datasets]]\nresolution = 32\nimage_directory = "{images}"\n')
    assert main(["dataset", "check", "--dataset_config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "3 items, 3 readable" in out and "0 errors, 3 warnings" in out
    for text in ("turned.jpg: EXIF orientation 8: viewers show it rotated 90° counter-clockwise, but it is trained as stored",
                 "clear.png: transparent pixels composited onto white; musubi-tuner drops the alpha channel, so the two tools' "
                 "caches of this image differ",
                 "anim.gif: skipped: '.gif' is not one of musubi-tuner's image extensions"):
        assert text in out, text
    assert "plain.png" not in out


def test_doctor_exit_zero_on_clean_dataset(tmp_path, capsys):
    assert main(["dataset", "check", "--dataset_config", str(good_dataset(tmp_path))]) == 0
    assert "no errors" in capsys.readouterr().out


@pytest.fixture
def cached(tmp_path, tiny_files):
    cfg = good_dataset(tmp_path, sizes=[(64, 64)] * 5 + [(96, 64)] * 3 + [(64, 96)] * 2)
    for i in range(0, 10, 3):  # captions of several token lengths: some batches need padding and a mask
        (tmp_path / "images" / f"img{i}.txt").write_text(f"caption number {i}" + " and more" * i)
    for kind in ("latents", "text"):
        assert main([f"cache-{kind}", "--dataset_config", str(cfg), "--model", str(tiny_files["repo"]), "--device", "cpu"]) == 0
    return cfg


def _plan(cfg, seed=0):
    datasets = load_dataset_config(cfg)
    items = scan_caches(datasets, QwenImageFamily())
    return items, BatchPlan(items, datasets, seed)


def test_batches_come_from_one_bucket_and_order_is_seeded(cached):
    items, plan = _plan(cached)
    assert len(plan) == 3 + 2 + 1  # batch_size 2 over buckets of 5, 3, 2 items
    for batch in plan.epoch(0):
        assert len({items[i].bucket for i in batch}) == 1
    assert plan.epoch(0) == _plan(cached)[1].epoch(0)
    assert plan.epoch(0) != plan.epoch(1) or plan.epoch(0) != plan.epoch(2)
    assert sorted(i for b in plan.epoch(3) for i in b) == list(range(10))
    assert _plan(cached, seed=1)[1].epoch(0) != plan.epoch(0)


def test_loader_batches_restart_exactly_and_match_across_workers(cached):
    items, plan = _plan(cached)
    data = CacheDataset(items, QwenImageFamily())
    full = [b["keys"] for b in make_loader(data, plan, epoch=2)]
    resumed = [b["keys"] for b in make_loader(data, plan, epoch=2, start=4)]
    assert resumed == full[4:]
    workers = list(make_loader(data, plan, epoch=2, num_workers=2))
    assert [b["keys"] for b in workers] == full
    processes = list(make_loader(data, plan, epoch=2, num_workers=2, processes=True))
    assert [b["keys"] for b in processes] == full
    assert all(torch.equal(a["latents"], b["latents"]) for a, b in zip(workers, processes))
    batch = workers[0]
    b = len(batch["keys"])
    assert batch["latents"].shape[:3] == (b, 16, 1) and batch["latents"].dtype == torch.bfloat16
    assert batch["cond"].embeds.shape[0] == b and batch["cond"].embeds.shape[2] == 128
    assert all(w["cond"].embeds.dtype == torch.bfloat16 for w in workers)
    assert all(torch.equal(a["cond"].embeds, b["cond"].embeds) for a, b in zip(workers, processes))
    # captions of equal token length: no mask (the model runs unmasked); of different lengths: zero-padded, masked
    assert any(w["cond"].mask is None for w in workers)
    cond = next(w["cond"] for w in workers if w["cond"].mask is not None)
    b = cond.embeds.shape[0]
    assert cond.mask.shape == cond.embeds.shape[:2]
    lengths = cond.mask.sum(1)
    assert len(set(lengths.tolist())) > 1
    for i in range(b):
        assert cond.embeds[i, lengths[i]:].abs().sum() == 0 and cond.embeds[i, : lengths[i]].abs().sum() > 0


def test_num_repeats_multiplies_items(cached):
    cached.write_text(cached.read_text().replace("batch_size = 2", "batch_size = 2\nnum_repeats = 3"))
    items, plan = _plan(cached)
    assert sum(len(b) for b in plan.epoch(0)) == 30


def test_cache_not_matching_config_is_an_error(cached):
    cached.write_text(cached.read_text().replace("resolution = [64, 64]", "resolution = [48, 48]"))
    with pytest.raises(CacheError, match=r"img0_0064x0064_qi.safetensors: cached at 64x64, but the dataset config now puts"):
        _plan(cached)


def test_two_latent_caches_of_one_item_are_an_error(cached, tmp_path):
    import shutil

    cache = tmp_path / "cache"
    shutil.copy(cache / "img0_0064x0064_qi.safetensors", cache / "img0_0048x0048_qi.safetensors")
    with pytest.raises(CacheError, match=r"img0_0048x0048_qi.safetensors and img0_0064x0064_qi.safetensors are latent caches "
                                         r"of the same item 'img0'"):
        _plan(cached)


def test_missing_text_cache_leaves_the_item_out_with_a_warning(cached, tmp_path, caplog):
    next((tmp_path / "cache").glob("*_te.safetensors")).unlink()
    items, _ = _plan(cached)
    assert len(items) == 9 and "1 latent caches have no text cache" in caplog.text
