"""flowtuner's datasets and caches against musubi-tuner's own code (the vendored copy, `musubi` fixture):

(a) its config validation and dataset construction accept / reject the same configs and give the same items,
    folders and buckets;
(b) caches written by its cache writers are read bitwise by flowtuner's loader, and caches flowtuner writes are
    read bitwise by its training dataset, with the same bucket grouping; a cache it rewrites is not flowtuner's;
(c) its resize gives flowtuner's pixels: the function itself, and the whole path from an image file to the
    pixels its caching pipeline hands to the VAE.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter, defaultdict
from multiprocessing import Value
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowtuner.data.buckets import BucketSelector, resize_to_bucket
from flowtuner.data.cache import (
    UNVERIFIED, check_cache, save_latent_cache, save_text_cache, text_cache_path, written_by_flowtuner,
)
from flowtuner.data.caching import CacheSummary, _latent_tasks, _load_for_bucket
from flowtuner.data.config import load_dataset_config
from flowtuner.data.images import decode, read_info
from flowtuner.data.loader import BatchPlan, CacheDataset, make_loader, scan_caches
from flowtuner.data.sources import collect_items
from flowtuner.errors import ConfigError
from flowtuner.families.qwen_image import QwenImageFamily
from tests.datasets import line_drawing, noise_image, write_config

ARCH = "qi"
FAMILY = QwenImageFamily()


# ---------------------------------------------------------------------------------------------- musubi's side

def musubi_datasets(musubi, cfg: Path, training: bool = False):
    """musubi-tuner's dataset objects for a config, built as its caching / training scripts build them."""
    from musubi_tuner.dataset import config_utils

    user_config = config_utils.load_user_config(str(cfg))
    blueprint = config_utils.BlueprintGenerator(config_utils.ConfigSanitizer()).generate(
        user_config, argparse.Namespace(debug_dataset=False), architecture=ARCH)
    group = config_utils.generate_dataset_group_by_blueprint(blueprint.dataset_group, training=training,
                                                             shared_epoch=Value("i", 0) if training else None)
    return group.datasets


def musubi_latent_items(dataset) -> list:
    """Every ItemInfo of musubi's latent caching pipeline, content as its encode step gets it (alpha dropped)."""
    items = []
    for _, batch in dataset.retrieve_latent_cache_batches(num_workers=1):
        for item in batch:
            item.content = item.content[..., :3] if item.content.shape[-1] == 4 else item.content
            items.append(item)
    return items


def musubi_text_items(dataset) -> list:
    return [item for batch in dataset.retrieve_text_encoder_output_cache_batches(num_workers=1) for item in batch]


# ---------------------------------------------------------------------------------------------- (a) configs

@pytest.fixture
def root(tmp_path, monkeypatch):
    """A working directory with a captioned image folder, a JSONL and a config folder one level down."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, (w, h) in enumerate([(64, 64), (96, 48), (40, 72), (50, 50)]):
        noise_image(w, h, i).save(imgs / f"im{i}.png")
        (imgs / f"im{i}.txt").write_text(f"caption {i}")
    (tmp_path / "meta.jsonl").write_text("".join(json.dumps({"image_path": str(imgs / f"im{i}.png"), "caption": f"c{i}"}) + "\n"
                                                 for i in range(2)))
    (tmp_path / "cfg").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


BOTH_ACCEPT = {
    "minimal": '[[datasets]]\nimage_directory = "{root}/imgs"\ncaption_extension = ".txt"\n',
    "general, buckets, no upscale": '[general]\nresolution = [64, 48]\ncaption_extension = ".txt"\nbatch_size = 2\n'
                                    'enable_bucket = true\nbucket_no_upscale = true\n'
                                    '[[datasets]]\nimage_directory = "{root}/imgs"\n'
                                    'cache_directory = "{root}/c1"\nnum_repeats = 3\n',
    "int resolution, dataset overrides general": '[general]\nresolution = 32\nbatch_size = 4\n[[datasets]]\n'
                                                 'image_directory = "{root}/imgs"\nresolution = 64\nenable_bucket = true\n',
    "relative paths (working directory)": '[[datasets]]\nimage_directory = "imgs"\ncache_directory = "rel_cache"\n'
                                          'caption_extension = ".txt"\n',
    "directory and JSONL: directory wins": '[[datasets]]\nimage_directory = "{root}/imgs"\n'
                                           'image_jsonl_file = "{root}/meta.jsonl"\n'
                                           'caption_extension = ".txt"\n',
    "JSONL": '[[datasets]]\nimage_jsonl_file = "{root}/meta.jsonl"\ncache_directory = "{root}/cj"\n',
    "deprecated alias": '[[datasets]]\nimage_directory = "{root}/imgs"\ncaption_extension = ".txt"\n'
                        'qwen_image_edit_control_resolution = [64, 64]\n',
    "two datasets": '[[datasets]]\nimage_directory = "{root}/imgs"\ncaption_extension = ".txt"\n[[datasets]]\n'
                    'image_jsonl_file = "meta.jsonl"\ncache_directory = "cj"\n',
}
BOTH_REJECT = {
    "unknown dataset key": '[[datasets]]\nimage_dir = "{root}/imgs"\n',
    "unknown general key": '[general]\nresoluton = 64\n[[datasets]]\nimage_directory = "{root}/imgs"\n',
    "dataset key in general": '[general]\ncache_directory = "x"\n[[datasets]]\nimage_directory = "{root}/imgs"\n',
    "unknown top-level table": '[extra]\na = 1\n[[datasets]]\nimage_directory = "{root}/imgs"\n',
    "string batch_size": '[[datasets]]\nimage_directory = "{root}/imgs"\nbatch_size = "4"\n',
    "three-number resolution": '[[datasets]]\nimage_directory = "{root}/imgs"\nresolution = [1, 2, 3]\n',
    "int for a bool": '[[datasets]]\nimage_directory = "{root}/imgs"\nenable_bucket = 1\n',
    "shared cache_directory": '[[datasets]]\nimage_directory = "{root}/imgs"\ncache_directory = "c"\n[[datasets]]\n'
                              'image_jsonl_file = "meta.jsonl"\ncache_directory = "c"\n',
    "invalid TOML": '[general\nresolution = 5\n',
    "no datasets": '[general]\nresolution = 64\n',
    "video dataset (Qwen-Image)": '[[datasets]]\nvideo_directory = "{root}/imgs"\n',
}
# musubi-tuner takes these and fails later (or silently finds nothing); flowtuner refuses them up front with a
# one-line reason (docs/datasets.md).
FLOWTUNER_STRICTER = {
    "missing image_directory": ('[[datasets]]\nimage_directory = "{root}/nowhere"\n', "does not exist"),
    "batch_size 0": ('[[datasets]]\nimage_directory = "{root}/imgs"\nbatch_size = 0\n', "'batch_size' must be >= 1"),
    "bool for an int": ('[[datasets]]\nimage_directory = "{root}/imgs"\nbatch_size = true\n', "must be an integer"),
    "JSONL without cache_directory": ('[[datasets]]\nimage_jsonl_file = "{root}/meta.jsonl"\n', "'cache_directory' is required"),
    "layered dataset": ('[[datasets]]\nimage_directory = "{root}/imgs"\nmultiple_target = true\n', "not supported yet"),
}


def _config(root: Path, body: str) -> Path:
    return write_config(root / "cfg" / "d.toml", body.replace("{root}", str(root)))


def _items_and_buckets_musubi(m) -> dict[str, tuple[int, int]]:
    from musubi_tuner.dataset.bucket import BucketSelector as MusubiBuckets
    from musubi_tuner.dataset.datasources import ImageDirectoryDatasource

    selector = MusubiBuckets(m.resolution, m.enable_bucket, m.bucket_no_upscale, ARCH)
    if isinstance(m.datasource, ImageDirectoryDatasource):
        paths = m.datasource.image_paths
    else:
        paths = [d["image_path"] for d in m.datasource.data]
    return {os.path.abspath(p): tuple(selector.get_bucket_resolution(Image.open(p).size)) for p in paths}


def _items_and_buckets_flowtuner(ds) -> dict[str, tuple[int, int]]:
    selector = BucketSelector(ds.resolution, ds.enable_bucket, ds.bucket_no_upscale, FAMILY.size_step)
    items, _ = collect_items(ds)
    return {str(it.image): tuple(selector.select(read_info(it.image).width, read_info(it.image).height)) for it in items}


@pytest.mark.parametrize("name", sorted(BOTH_ACCEPT))
def test_configs_musubi_accepts_resolve_alike(musubi, root, name):
    from musubi_tuner.dataset.datasources import ImageDirectoryDatasource

    cfg = _config(root, BOTH_ACCEPT[name])
    theirs, ours = musubi_datasets(musubi, cfg), load_dataset_config(cfg)
    assert len(theirs) == len(ours)
    for m, ds in zip(theirs, ours):
        assert tuple(m.resolution) == ds.resolution and m.batch_size == ds.batch_size and m.num_repeats == ds.num_repeats
        assert (m.enable_bucket, m.bucket_no_upscale) == (ds.enable_bucket, ds.bucket_no_upscale and ds.enable_bucket)
        assert (m.caption_extension or ".txt") == ds.caption_extension
        assert os.path.abspath(m.cache_directory) == str(ds.cache_directory)
        if isinstance(m.datasource, ImageDirectoryDatasource):
            assert ds.image_jsonl_file is None and os.path.abspath(m.image_directory) == str(ds.image_directory)
        else:
            assert ds.image_directory is None and os.path.abspath(m.image_jsonl_file) == str(ds.image_jsonl_file)
        assert (None if m.control_resolution is None else tuple(m.control_resolution)) == ds.control_resolution
        assert _items_and_buckets_musubi(m) == _items_and_buckets_flowtuner(ds)


@pytest.mark.parametrize("name", sorted(BOTH_REJECT))
def test_configs_musubi_rejects_flowtuner_rejects(musubi, root, name):
    cfg = _config(root, BOTH_REJECT[name])
    with pytest.raises(Exception):  # voluptuous, ValueError, TOML errors: whatever musubi raises
        musubi_datasets(musubi, cfg)
    with pytest.raises(ConfigError) as err:
        load_dataset_config(cfg)
    assert str(cfg) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name", sorted(FLOWTUNER_STRICTER))
def test_configs_flowtuner_refuses_up_front(musubi, root, name):
    body, message = FLOWTUNER_STRICTER[name]
    cfg = _config(root, body)
    musubi_datasets(musubi, cfg)  # accepted by musubi-tuner's config code
    with pytest.raises(ConfigError, match=message):
        load_dataset_config(cfg)


# ---------------------------------------------------------------------------------------------- (c) resize

RESIZES = [  # (image W, H) -> bucket (W, H): non-integer scales down and up, odd sizes, crop only, no change
    ((301, 211), (208, 144)), ((1037, 777), (640, 480)), ((999, 333), (512, 176)), ((80, 61), (64, 48)),
    ((500, 333), (496, 320)), ((37, 29), (64, 48)), ((101, 77), (240, 176)), ((33, 97), (48, 128)),
    ((64, 80), (64, 64)), ((64, 64), (64, 64)),
]


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_resize_is_musubis_resize_image_to_bucket(musubi, mode):
    from musubi_tuner.dataset.media_utils import resize_image_to_bucket

    for i, (size, bucket) in enumerate(RESIZES):
        img = line_drawing(*size, mode=mode, seed=i)
        ours = resize_to_bucket(img, bucket)
        np.testing.assert_array_equal(ours, resize_image_to_bucket(img, bucket), err_msg=f"{mode} {size}->{bucket}")
        assert ours.shape[:2] == (bucket[1], bucket[0])
        array = np.asarray(img)
        np.testing.assert_array_equal(resize_to_bucket(array, bucket), resize_image_to_bucket(array, bucket))


# ------------------------------------------------------------------- (b) + (c): the caching pipelines themselves

def _zoo(folder: Path) -> dict[str, str]:
    """Image files of every kind musubi-tuner reads alike, plus a transparent one (flowtuner differs, on purpose)."""
    folder.mkdir()
    files = {
        "lines_down": (line_drawing(301, 211), "png"), "lines_up": (line_drawing(37, 29, seed=1), "png"),
        "odd": (line_drawing(81, 47, seed=2), "png"), "grey": (line_drawing(90, 70, "L", seed=3), "png"),
        "palette": (line_drawing(70, 90, "P", seed=4), "png"), "cmyk": (line_drawing(66, 50, "CMYK", seed=5), "jpg"),
        "opaque_rgba": (line_drawing(77, 55, seed=6).convert("RGBA"), "png"),
        "transparent": (line_drawing(60, 60, "RGBA", seed=7), "png"),
    }
    for stem, (img, ext) in files.items():
        img.save(folder / f"{stem}.{ext}")
        (folder / f"{stem}.txt").write_text(f"a caption for {stem}")
    exif = Image.Exif()
    exif[0x0112] = 6
    line_drawing(120, 80, seed=8).save(folder / "rotated.jpg", exif=exif)  # viewers show it 80x120
    (folder / "rotated.txt").write_text("rotated")
    return files


@pytest.fixture
def zoo_config(tmp_path):
    _zoo(tmp_path / "imgs")
    return write_config(tmp_path / "d.toml", f"""
[general]
caption_extension = ".txt"
enable_bucket = true
batch_size = 2

[[datasets]]
image_directory = "{tmp_path / 'imgs'}"
cache_directory = "{tmp_path / 'cache_buckets'}"
resolution = [64, 48]
num_repeats = 2

[[datasets]]
image_directory = "{tmp_path / 'imgs'}"
cache_directory = "{tmp_path / 'cache_no_upscale'}"
resolution = [96, 96]
bucket_no_upscale = true
""")


def _flowtuner_latent_tasks(cfg: Path) -> list:
    summary = CacheSummary("latent")
    tasks = _latent_tasks(load_dataset_config(cfg), FAMILY, "vae-id", summary, defaultdict(set))
    assert not summary.failed
    return tasks


def test_caching_pipelines_give_the_same_files_buckets_and_pixels(musubi, zoo_config):
    """From image file to the pixels handed to the VAE and the cache file name: musubi-tuner's caching code vs
    flowtuner's, for both datasets (buckets; bucket_no_upscale), EXIF-rotated, greyscale, palette, CMYK, RGBA."""
    theirs = {}
    for m in musubi_datasets(musubi, zoo_config):
        for item in musubi_latent_items(m):
            theirs[item.latent_cache_path] = (tuple(item.bucket_size), item.content)
    ours = {str(t.path): t for t in _flowtuner_latent_tasks(zoo_config)}
    assert sorted(theirs) == sorted(ours) and len(ours) == 18
    assert any(p.endswith("rotated_0120x0080_qi.safetensors") for p in ours)  # the stored size, as musubi names it
    scales = Counter()
    for path, (bucket, pixels) in theirs.items():
        task, mine = _load_for_bucket(ours[path])
        assert task.bucket == bucket, path
        scales[np.sign(np.log(max(bucket[0] / task.size[0], bucket[1] / task.size[1])))] += 1
        if "transparent" in path:  # documented difference: composited onto white, where musubi drops alpha
            assert decode(task.item.image).differences and not np.array_equal(mine, pixels)
            continue
        np.testing.assert_array_equal(mine, pixels, err_msg=path)
    assert scales[1] >= 2 and scales[-1] >= 6  # enlarged and shrunk images both compared


def _random_latent(bucket: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    return torch.randn(16, 1, bucket[1] // 8, bucket[0] // 8, generator=gen).to(torch.bfloat16)


def _flowtuner_batches(cfg: Path) -> tuple[dict, dict, dict]:
    """Everything flowtuner's training loader delivers: key -> latent, key -> valid text tokens, and the
    (dataset, bucket) grouping with repeats."""
    datasets = load_dataset_config(cfg)
    items = scan_caches(datasets, FAMILY)
    plan = BatchPlan(items, datasets, seed=0)
    latents, texts = {}, {}
    for batch in make_loader(CacheDataset(items, FAMILY), plan, epoch=0):
        for i, key in enumerate(batch["keys"]):
            latents[key] = batch["latents"][i]
            cond = batch["cond"]
            texts[key] = cond.embeds[i] if cond.mask is None else cond.embeds[i, : int(cond.mask[i].sum())]
    groups = {(d, bucket): Counter(items[i].key for i in members) for (d, bucket), members in plan.groups.items()}
    return latents, texts, groups


def _musubi_training_batches(musubi, cfg: Path) -> tuple[dict, dict, dict]:
    """The same, from musubi-tuner's training dataset (its __getitem__ batches and its bucket manager)."""
    latents, texts, groups = {}, {}, {}
    for d, m in enumerate(musubi_datasets(musubi, cfg, training=True)):
        manager = m.batch_manager
        for reso, bucket in manager.buckets.items():
            groups[(d, tuple(reso[:2]))] = Counter(item.item_key for item in bucket)
        for idx in range(len(m)):
            batch = m[idx]
            reso, batch_no = manager.bucket_batch_indices[idx]
            chosen = manager.buckets[reso][batch_no * manager.batch_size : (batch_no + 1) * manager.batch_size]
            for i, item in enumerate(chosen):
                latents[item.item_key] = batch["latents"][i]
                texts[item.item_key] = batch["vl_embed"][i]
    return latents, texts, groups


def test_musubi_written_caches_are_read_bitwise_by_flowtuner(musubi, zoo_config):
    from musubi_tuner.dataset.cache_io import save_latent_cache_qwen_image, save_text_encoder_output_cache_qwen_image

    gen = torch.Generator().manual_seed(0)
    written_latents, written_texts = {}, {}
    for d, m in enumerate(musubi_datasets(musubi, zoo_config)):
        for item in musubi_latent_items(m):
            latent = _random_latent(item.bucket_size, gen)
            save_latent_cache_qwen_image(item, latent, None)
            written_latents[(d, Path(item.latent_cache_path).name.rsplit("_", 2)[0])] = latent
        for item in musubi_text_items(m):
            embed = torch.randn(5 + len(item.caption) % 7, 64, generator=gen).to(torch.bfloat16)
            save_text_encoder_output_cache_qwen_image(item, embed)
            written_texts[(d, Path(item.text_encoder_output_cache_path).name.removesuffix("_qi_te.safetensors"))] = embed
    assert sorted(written_latents) == sorted(written_texts) and len(written_latents) == 18
    for d in (0, 1):
        latents, texts, ours = _flowtuner_batches(_only_dataset(zoo_config, d))
        assert sorted(latents) == sorted(k for i, k in written_latents if i == d)
        for key, latent in latents.items():
            assert latent.dtype == torch.bfloat16 and torch.equal(latent, written_latents[(d, key)])
            assert torch.equal(texts[key], written_texts[(d, key)])
        assert ours == _musubi_training_batches(musubi, _only_dataset(zoo_config, d))[2]
    for path in zoo_config.parent.glob("cache_*/*.safetensors"):
        assert check_cache(path, {}, None).state == UNVERIFIED and not written_by_flowtuner(path)


def _only_dataset(cfg: Path, d: int) -> Path:
    """The config with only its d-th [[datasets]] entry (so each side's indices and groups are comparable)."""
    general, *entries = cfg.read_text().split("[[datasets]]")
    return write_config(cfg.with_name(f"only{d}.toml"), general + "[[datasets]]" + entries[d])


def test_flowtuner_written_caches_are_read_bitwise_by_musubis_training_dataset(musubi, zoo_config):
    gen = torch.Generator().manual_seed(1)
    written_latents, written_texts = {}, {}
    for task in _flowtuner_latent_tasks(zoo_config):
        latent = _random_latent(task.bucket, gen)
        save_latent_cache(task.path, latent, FAMILY.architecture, task.size, {**task.expected, "source": {}})
        embed = torch.randn(3 + len(task.item.key), 64, generator=gen).to(torch.bfloat16)
        save_text_cache(text_cache_path(task.dataset.cache_directory, task.item.key, ARCH), {"varlen_vl_embed": embed}, FAMILY.architecture,
                        task.item.caption, {"caption": task.item.caption})
        written_latents[(task.dataset.index, task.item.key)] = latent
        written_texts[(task.dataset.index, task.item.key)] = embed
    for d in (0, 1):
        cfg = _only_dataset(zoo_config, d)
        latents, texts, theirs = _musubi_training_batches(musubi, cfg)
        assert sorted(latents) == sorted(k for i, k in written_latents if i == d)
        for key in latents:
            assert torch.equal(latents[key], written_latents[(d, key)]) and torch.equal(texts[key], written_texts[(d, key)])
        _, _, ours = _flowtuner_batches(cfg)
        assert theirs == ours


def test_a_cache_musubi_rewrites_is_no_longer_flowtuners(musubi, tmp_path):
    """musubi-tuner's text cache writer merges into an existing file and keeps its metadata, flowtuner's record
    included: the content digest still tells that the tensors are not what flowtuner wrote."""
    from musubi_tuner.dataset.cache_io import save_latent_cache_qwen_image, save_text_encoder_output_cache_qwen_image
    from musubi_tuner.dataset.image_video_dataset import ItemInfo
    from safetensors import safe_open

    text, latent = tmp_path / "a_qi_te.safetensors", tmp_path / "a_0064x0064_qi.safetensors"
    expected = {"caption": "a cat", "model": "te", "recipe": "r"}
    save_text_cache(text, {"varlen_vl_embed": torch.ones(4, 8, dtype=torch.bfloat16)}, "qwen_image", "a cat", expected)
    save_latent_cache(latent, torch.ones(16, 1, 8, 8, dtype=torch.bfloat16), "qwen_image", (64, 64), {"recipe": "r"})
    assert check_cache(text, expected, None).state == "fresh"
    item = ItemInfo("a", "a cat", (64, 64), (64, 64), latent_cache_path=str(latent))
    item.text_encoder_output_cache_path = str(text)
    save_text_encoder_output_cache_qwen_image(item, torch.zeros(4, 8, dtype=torch.bfloat16))
    with safe_open(str(text), "pt") as f:
        assert json.loads(f.metadata()["flowtuner.caption"]) == "a cat"  # musubi kept flowtuner's record
    status = check_cache(text, expected, None)
    assert (status.state, status.reason) == (UNVERIFIED, "changed since flowtuner wrote it (rewritten by another tool?)")
    save_latent_cache_qwen_image(item, torch.zeros(16, 1, 8, 8, dtype=torch.bfloat16), None)
    assert check_cache(latent, {"recipe": "r"}, None).state == UNVERIFIED
    assert not written_by_flowtuner(text) and not written_by_flowtuner(latent)
