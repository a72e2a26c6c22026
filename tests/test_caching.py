"""cache-latents / cache-text: musubi-tuner's file format, staleness, atomic writes, kill-and-rerun."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flowtuner.cli import main
from flowtuner.data.buckets import resize_to_bucket
from flowtuner.data.images import read_rgb
from tests.datasets import good_dataset, noise_image, write_item

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cache(kind, cfg, repo, *extra):
    return main([f"cache-{kind}", "--dataset_config", str(cfg), "--model", str(repo), "--device", "cpu",
                 "--num_workers", "1", *extra])


def summary(capsys) -> str:
    return capsys.readouterr().out


@pytest.fixture
def dataset(tmp_path):
    return good_dataset(tmp_path)


def test_files_in_musubi_format_and_latents_correct(tmp_path, dataset, tiny_files, tiny_models, capsys):
    repo = tiny_files["repo"]
    assert cache("latents", dataset, repo) == 0 and cache("text", dataset, repo) == 0
    out = tmp_path / "cache"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["img0_0064x0064_qi.safetensors", "img0_qi_te.safetensors", "img1_0096x0064_qi.safetensors",
                     "img1_qi_te.safetensors", "img2_0064x0096_qi.safetensors", "img2_qi_te.safetensors",
                     "img3_0080x0080_qi.safetensors", "img3_qi_te.safetensors"]
    with safe_open(str(out / "img1_0096x0064_qi.safetensors"), "pt") as f:
        meta = f.metadata()
        assert list(f.keys()) == ["latents_1x6x10_bfloat16"]  # bucket 80x48 -> latent 10x6
        latent = f.get_tensor("latents_1x6x10_bfloat16")
    assert latent.shape == (16, 1, 6, 10)
    assert {k: meta[k] for k in ("architecture", "width", "height", "format_version")} == \
        {"architecture": "qwen_image", "width": "96", "height": "64", "format_version": "1.0.1"}
    vae = tiny_models["vae"]
    pixels = torch.from_numpy(np.array(resize_to_bucket(read_rgb(tmp_path / "images/img1.png"), (80, 48))))
    x = (pixels.permute(2, 0, 1).float() / 255 * 2 - 1)[None, :, None]
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(latent.float(), ((z - mean) / std)[0], atol=2e-2, rtol=1e-2)  # bf16 storage
    with safe_open(str(out / "img1_qi_te.safetensors"), "pt") as f:
        assert f.metadata()["caption1"] == "caption number 1"
        embed = f.get_tensor("varlen_vl_embed_bfloat16")
    assert embed.dim() == 2 and embed.shape[1] == 128 and embed.shape[0] == len(
        QwenTok(tiny_files).tokenize(["caption number 1"])[0][0]) - 34


def QwenTok(tiny_files):
    from transformers import Qwen2Tokenizer

    from flowtuner.families.qwen_image.text_encoder import QwenTextEncoder

    return QwenTextEncoder(None, Qwen2Tokenizer.from_pretrained(str(tiny_files["tokenizer"])))


def test_only_missing_or_stale_items_are_recomputed(tmp_path, dataset, tiny_files, capsys):
    repo = tiny_files["repo"]
    cache("latents", dataset, repo), cache("text", dataset, repo)
    summary(capsys)
    assert cache("latents", dataset, repo) == 0 and "0 cached, 4 fresh" in summary(capsys)
    images = tmp_path / "images"
    os.utime(images / "img0.png", ns=(1, 1))  # touched, same content: still fresh
    noise_image(64, 64, seed=99).save(images / "img3.png")  # new content, new size: new file name
    noise_image(64, 96, seed=98).save(images / "img2.png")  # new content, same size
    (images / "img1.txt").write_text("a new caption")
    assert cache("latents", dataset, repo) == 0
    out = summary(capsys)
    assert "2 cached, 2 fresh" in out and "1 removed" in out and "source image changed" in out
    assert not (tmp_path / "cache/img3_0080x0080_qi.safetensors").exists()
    assert cache("text", dataset, repo) == 0
    out = summary(capsys)
    assert "1 cached, 3 fresh" in out and "caption changed" in out
    dataset.write_text(dataset.read_text().replace("resolution = [64, 64]", "resolution = [48, 48]"))
    assert cache("latents", dataset, repo) == 0 and "4 cached" in summary(capsys)


def test_other_weights_make_caches_stale(tmp_path, dataset, tiny_files, tiny_models, capsys):
    import shutil

    from flowtuner.families.qwen_image.tiny import tiny_vae

    cache("latents", dataset, tiny_files["repo"])
    summary(capsys)
    other = tmp_path / "other_vae"
    tiny_vae(seed=5).save_pretrained(other)
    shutil.copy(tiny_files["repo"] / "vae" / "config.json", other / "config.json")
    assert main(["cache-latents", "--dataset_config", str(dataset), "--vae", str(other), "--device", "cpu"]) == 0
    out = summary(capsys)
    assert "4 cached" in out and "4 x model changed" in out


def test_musubi_cache_is_unverified_and_kept(tmp_path, dataset, tiny_files, capsys):
    out = tmp_path / "cache"
    out.mkdir()
    save_file({"latents_1x8x8_bfloat16": torch.zeros(16, 1, 8, 8, dtype=torch.bfloat16)}, out / "img0_0064x0064_qi.safetensors",
              {"architecture": "qwen_image", "width": "64", "height": "64", "format_version": "1.0.1"})
    assert cache("latents", dataset, tiny_files["repo"]) == 0
    assert "3 cached, 0 fresh (skipped), 1 unverified" in summary(capsys)
    with safe_open(str(out / "img0_0064x0064_qi.safetensors"), "pt") as f:
        assert f.get_tensor("latents_1x8x8_bfloat16").abs().sum() == 0  # untouched


def test_orphans_removed_unless_keep_cache_and_skip_existing_keeps_stale(tmp_path, dataset, tiny_files, capsys):
    repo = tiny_files["repo"]
    cache("latents", dataset, repo)
    summary(capsys)
    (tmp_path / "images/img0.png").unlink()
    (tmp_path / "images/img0.txt").unlink()
    noise_image(96, 64, seed=42).save(tmp_path / "images/img1.png")
    assert cache("latents", dataset, repo, "--keep_cache", "--skip_existing") == 0
    out = summary(capsys)
    assert "0 cached" in out and "0 removed" in out and "1 stale caches kept because of --skip_existing" in out
    assert (tmp_path / "cache/img0_0064x0064_qi.safetensors").exists()
    assert cache("latents", dataset, repo) == 0
    out = summary(capsys)
    assert "1 cached" in out and "1 removed" in out
    assert not (tmp_path / "cache/img0_0064x0064_qi.safetensors").exists()


def test_bad_items_are_reported_and_the_rest_cached(tmp_path, dataset, tiny_files, capsys):
    images = tmp_path / "images"
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (images / "broken.txt").write_text("x")
    write_item(images, "nocaption", noise_image(64, 64), None)
    (images / "empty.txt").write_text("  ")
    noise_image(64, 64).save(images / "empty.png")
    assert cache("latents", dataset, tiny_files["repo"]) == 1
    out = summary(capsys)
    assert "6 cached" in out and "1 failed" in out and "broken.png" in out
    assert cache("text", dataset, tiny_files["repo"]) == 1
    out = summary(capsys)
    assert "2 failed" in out and "nocaption.png: missing or empty caption" in out and "empty.png" in out


KILLER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from flowtuner.weights import writer
    calls = {{"n": 0}}
    original = writer._publish
    def publish(tmp, path, overwrite):
        calls["n"] += 1
        if calls["n"] == 3:  # the temporary file is complete, the rename has not happened
            os.kill(os.getpid(), signal.SIGKILL)
        original(tmp, path, overwrite)
    writer._publish = publish
    from flowtuner.cli import main
    main(sys.argv[1:])
""")


def test_kill_minus_nine_mid_write_then_rerun_completes(tmp_path, dataset, tiny_files, capsys):
    args = ["cache-latents", "--dataset_config", str(dataset), "--model", str(tiny_files["repo"]), "--device", "cpu",
            "--batch_size", "1", "--num_workers", "1"]
    proc = subprocess.run([sys.executable, "-c", KILLER.format(root=REPO_ROOT), *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": REPO_ROOT})
    assert proc.returncode == -9
    out = tmp_path / "cache"
    finished = sorted(out.glob("*_qi.safetensors"))
    assert len(finished) == 2 and len(list(out.glob(".*.tmp"))) == 1  # two done, one cut before the rename
    for path in finished:
        with safe_open(str(path), "pt") as f:
            assert len(list(f.keys())) == 1
    assert main(args) == 0
    assert "2 cached, 2 fresh" in summary(capsys)
    assert len(list(out.glob("*_qi.safetensors"))) == 4 and not list(out.glob(".*.tmp"))


MUSUBI_LATENT_META = {"architecture": "qwen_image", "width": "40", "height": "20", "format_version": "1.0.1"}


def test_other_tools_files_are_never_replaced_or_removed(tmp_path, dataset, tiny_files, capsys):
    """An EXIF-rotated image: musubi-tuner names its cache after the stored size (40x20) and so does flowtuner now,
    so musubi's file is found, kept untouched and reported; another tool's orphan is left in place and reported,
    while flowtuner's own orphan is removed."""
    from PIL import Image

    images, out = tmp_path / "images", tmp_path / "cache"
    exif = Image.Exif()
    exif[0x0112] = 6
    noise_image(40, 20, seed=5).save(images / "rot.jpg", exif=exif)
    (images / "rot.txt").write_text("rotated")
    out.mkdir()
    theirs = out / "rot_0040x0020_qi.safetensors"
    save_file({"latents_1x2x2_bfloat16": torch.ones(16, 1, 2, 2, dtype=torch.bfloat16)}, theirs, MUSUBI_LATENT_META)
    foreign_orphan = out / "gone_0064x0064_qi.safetensors"
    save_file({"latents_1x8x8_bfloat16": torch.zeros(16, 1, 8, 8, dtype=torch.bfloat16)}, foreign_orphan,
              {**MUSUBI_LATENT_META, "width": "64", "height": "64"})
    before = theirs.read_bytes()
    assert cache("latents", dataset, tiny_files["repo"]) == 0
    text = summary(capsys)
    assert "4 cached, 0 fresh (skipped), 1 unverified" in text and "0 removed" in text
    assert "unverified: 1 x no flowtuner provenance" in text
    assert ("1 cache files the dataset no longer produces were left in place because flowtuner did not write them "
            f"(e.g. {foreign_orphan})") in text
    assert theirs.read_bytes() == before and foreign_orphan.exists()
    assert not (out / "rot_0020x0040_qi.safetensors").exists()
    (images / "img0.png").unlink()  # flowtuner's own cache of it is now an orphan: removed
    assert cache("latents", dataset, tiny_files["repo"]) == 0
    assert "1 removed" in summary(capsys) and not (out / "img0_0064x0064_qi.safetensors").exists() and foreign_orphan.exists()


def _rewrite_keeping_metadata(path, tensor=None, **meta_changes):
    """What musubi-tuner's text cache writer does to an existing file: new tensors, the old metadata kept."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if tensor is not None:
        tensors = {k: tensor(v) for k, v in tensors.items()}
    save_file(tensors, path, {**meta, **meta_changes})


@pytest.mark.parametrize("change", ["tensor", "caption1"])
def test_a_file_rewritten_by_another_tool_is_no_longer_flowtuners(tmp_path, dataset, tiny_files, capsys, change):
    from flowtuner.data.cache import written_by_flowtuner

    repo = tiny_files["repo"]
    assert cache("text", dataset, repo) == 0
    path = tmp_path / "cache" / "img1_qi_te.safetensors"
    assert written_by_flowtuner(path)
    if change == "tensor":
        _rewrite_keeping_metadata(path, tensor=lambda t: t + 1)
    else:
        _rewrite_keeping_metadata(path, caption1="edited elsewhere")
    assert not written_by_flowtuner(path)
    rewritten = path.read_bytes()
    summary(capsys)
    assert cache("text", dataset, repo) == 0
    out = summary(capsys)
    assert "0 cached, 3 fresh (skipped), 1 unverified" in out and "changed since flowtuner wrote it" in out
    (tmp_path / "images/img1.png").unlink()
    (tmp_path / "images/img1.txt").unlink()
    assert cache("text", dataset, repo) == 0
    out = summary(capsys)
    assert "0 removed" in out and "1 cache files the dataset no longer produces were left in place" in out
    assert path.read_bytes() == rewritten


def test_content_digest_covers_every_tensor_byte_and_the_metadata(tmp_path):
    from flowtuner.data.cache import is_own_output, save_latent_cache
    from flowtuner.weights.reader import open_checkpoint

    path = tmp_path / "x_0064x0064_qi.safetensors"
    latent = torch.randn(16, 1, 8, 8).to(torch.bfloat16)
    save_latent_cache(path, latent, "qwen_image", (64, 64), {"recipe": "r"})
    assert is_own_output(open_checkpoint(path))
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # one bit of the last tensor element
    path.write_bytes(bytes(data))
    assert not is_own_output(open_checkpoint(path))
