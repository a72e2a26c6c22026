"""Edit-model datasets and caches (control images): discovery, sizing and pixels against musubi-tuner's own code,
latent caches with musubi's latents_control_{i} keys read bitwise by its training dataset, text caches encoded with
the controls, staleness when a control or its rule changes, homogeneous batches, and the doctor's lines.

The family here is a test double: Qwen-Image with max_controls = 3 and the `qie` file suffix, keeping the latent
caches' extra tensors (the real edit family is wired in families/)."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from flowtuner.data.buckets import area_bucket
from flowtuner.data.cache import read_provenance
from flowtuner.data.caching import CacheSummary, _latent_tasks, _load, cache_latents, cache_text
from flowtuner.data.config import load_dataset_config
from flowtuner.data.doctor import check_dataset
from flowtuner.data.loader import BatchPlan, CacheDataset, make_loader, scan_caches
from flowtuner.data.sources import collect_items
from flowtuner.families.base import Conditioning, TextEncoder
from flowtuner.families.qwen_image import QwenImageFamily
from flowtuner.weights.reader import open_checkpoint
from tests.datasets import line_drawing, noise_image, truncated_jpeg, write_config, write_item

ARCH = "qie"
CPU = torch.device("cpu")


class RecordingEncoder(TextEncoder):
    """Records the images each caption came with; embeddings depend on the caption and the images' pixels."""

    def __init__(self):
        self.calls: list[tuple[list[str], list[list[Image.Image]] | None]] = []

    def encode(self, prompts, images=None):
        self.calls.append((list(prompts), images))
        out = []
        for i, prompt in enumerate(prompts):
            seed = sum(map(ord, prompt)) + sum(int(np.asarray(im).sum()) for im in (images[i] if images else []))
            out.append(Conditioning(torch.randn(1, 3 + len(prompt) % 5, 64, generator=torch.Generator().manual_seed(seed))))
        return out


class EditFamily(QwenImageFamily):
    max_controls = 3
    cache_arch = ARCH

    def __init__(self, max_controls: int = 3):
        self.max_controls = max_controls
        self.encoder = RecordingEncoder()

    def cached_conditioning(self, text, latent_extras):
        cond = super().cached_conditioning(text, latent_extras)
        cond.extra["latent_extras"] = latent_extras
        return cond

    def load_text_encoder(self, paths, device):
        return self.encoder


def paths_of(family, tiny_files):
    return family.resolve_paths(model=str(tiny_files["repo"]))


# ---------------------------------------------------------------------------------------------- musubi's side

def musubi_datasets(cfg: Path, training: bool = False):
    from multiprocessing import Value

    from musubi_tuner.dataset import config_utils

    blueprint = config_utils.BlueprintGenerator(config_utils.ConfigSanitizer()).generate(
        config_utils.load_user_config(str(cfg)), argparse.Namespace(debug_dataset=False), architecture=ARCH)
    return config_utils.generate_dataset_group_by_blueprint(
        blueprint.dataset_group, training=training, shared_epoch=Value("i", 0) if training else None).datasets


def musubi_caching_items(dataset) -> dict[str, tuple[tuple, list[np.ndarray]]]:
    """item key -> (its caching batch key: bucket + every control's H, W; control pixels as its VAE gets them)."""
    out = {}
    for key, batch in dataset.retrieve_latent_cache_batches(num_workers=1):
        for item in batch:
            out[Path(item.item_key).stem] = (tuple(key), [c[..., :3] for c in item.control_content or []])
    return out


# ---------------------------------------------------------------------------------------------- datasets

def _targets(folder: Path, sizes: dict[str, tuple[int, int]]) -> None:
    for i, (stem, size) in enumerate(sizes.items()):
        write_item(folder, stem, noise_image(*size, seed=i), f"make {stem} red")


def test_control_discovery_is_musubis(musubi, tmp_path):
    """Directory mode: longer target names claim their controls first (a_1.png is target a_1's, not a's second),
    un-suffixed first then by number; JSONL: control_path, control_path_N renumbered in order."""
    images, controls = tmp_path / "images", tmp_path / "controls"
    _targets(images, {"a": (64, 64), "a_1": (64, 48), "b": (48, 64)})
    controls.mkdir()
    for name in ("a.png", "a_0.png", "a_2.png", "a_1.png", "a_1_0.png", "b_10.png", "b_2.jpg", "b.webp"):
        noise_image(32, 32).save(controls / name)
    rows = [{"image_path": str(images / "a.png"), "caption": "x", "control_path_3": str(controls / "b_10.png"),
             "control_path_1": str(controls / "a_0.png"), "control_path": str(controls / "a.png")},
            {"image_path": str(images / "b.png"), "caption": "y"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = write_config(tmp_path / "d.toml", f"""
[general]
resolution = 64
caption_extension = ".txt"
[[datasets]]
image_directory = "{images}"
control_directory = "{controls}"
[[datasets]]
image_jsonl_file = "{tmp_path / 'm.jsonl'}"
cache_directory = "{tmp_path / 'cj'}"
""")
    theirs_dir, theirs_jsonl = musubi_datasets(cfg)
    ours_dir, ours_jsonl = (collect_items(ds)[0] for ds in load_dataset_config(cfg))
    assert {it.image.name: [p.name for p in it.controls] for it in ours_dir} == {
        "a.png": ["a.png", "a_0.png", "a_2.png"], "a_1.png": ["a_1.png", "a_1_0.png"], "b.png": ["b.webp", "b_2.jpg", "b_10.png"]}
    src = theirs_dir.datasource
    assert {Path(k).name: [Path(p).name for p in v] for k, v in src.control_paths.items()} == \
        {it.image.name: [p.name for p in it.controls] for it in ours_dir}
    data = theirs_jsonl.datasource.data
    assert [[Path(d[f"control_path_{i}"]).name for i in range(3) if f"control_path_{i}" in d] for d in data] == \
        [[p.name for p in it.controls] for it in ours_jsonl] == [["a.png", "a_0.png", "b_10.png"], []]


RULES = {  # name -> dataset keys; controls of several sizes meet each rule's branches
    "default: the target's bucket": "",
    "control_resolution": "control_resolution = [96, 80]\n",
    "no_resize_control": "no_resize_control = true\n",
    "both (native up to the area)": "no_resize_control = true\ncontrol_resolution = [64, 64]\n",
}


@pytest.fixture
def edit_images(tmp_path):
    images, controls = tmp_path / "images", tmp_path / "controls"
    _targets(images, {"t0": (96, 64), "t1": (50, 70), "t2": (64, 64)})
    sizes = {"t0": (101, 67), "t0_1": (32, 80), "t1": (64, 48), "t2": (48, 32), "t2_0": (160, 40), "t2_1": (40, 41)}
    for i, (stem, size) in enumerate(sizes.items()):
        write_item(controls, stem, line_drawing(*size, seed=10 + i), None)
    return images, controls


@pytest.mark.parametrize("rule", sorted(RULES))
def test_control_sizes_pixels_and_bucket_keys_are_musubis(musubi, tmp_path, edit_images, rule):
    images, controls = edit_images
    cfg = write_config(tmp_path / "d.toml", f"""
[[datasets]]
resolution = [64, 64]
enable_bucket = true
caption_extension = ".txt"
image_directory = "{images}"
control_directory = "{controls}"
{RULES[rule]}""")
    theirs = musubi_caching_items(musubi_datasets(cfg)[0])
    summary = CacheSummary("latent")
    tasks = _latent_tasks(load_dataset_config(cfg), EditFamily(), "vae", summary, {})
    assert not summary.failed and sorted(t.item.key for t in tasks) == sorted(theirs)
    for task in tasks:
        key, pixels = theirs[task.item.key]
        _, loaded = _load(task)
        assert key[:2] == task.bucket and len(loaded.controls) == len(pixels) == (len(key) - 2) // 2
        for i, (control, mine, ref) in enumerate(zip(task.controls, loaded.controls, pixels)):
            theirs_size = (key[3 + 2 * i], key[2 + 2 * i])
            if theirs_size != task.control_sizes[i]:  # documented: musubi keeps an unfloored native size here
                w, h = Image.open(control).size
                assert rule.startswith("both") and theirs_size == (w, h) and task.control_sizes[i] == (w - w % 16, h - h % 16)
                continue
            np.testing.assert_array_equal(mine, ref, err_msg=f"{rule} {control.name}")
            compared[rule] += 1
    assert compared[rule] >= 5


compared = Counter()


def test_area_bucket_is_musubis_calculate_bucket_resolution(musubi):
    from musubi_tuner.dataset.bucket import BucketSelector

    for size in [(101, 67), (64, 200), (1920, 1080), (777, 333), (40, 41)]:
        for res in [(96, 80), (384, 384), (1024, 1024)]:
            assert area_bucket(*size, res, 16) == BucketSelector.calculate_bucket_resolution(size, res, reso_steps=16)
    with pytest.raises(ZeroDivisionError):  # musubi-tuner divides by zero where a candidate width is 0
        BucketSelector.calculate_bucket_resolution((32, 80), (48, 40), reso_steps=16)
    assert area_bucket(32, 80, (48, 40), 16) == (16, 112)


# ---------------------------------------------------------------------------------------------- caches

@pytest.fixture
def jsonl_dataset(tmp_path):
    """Items with 0, 1, 1 (other shape) and 2 controls, two per bucket where it matters."""
    images, controls = tmp_path / "images", tmp_path / "controls"
    _targets(images, {"none": (64, 64), "one": (64, 64), "one_b": (64, 64), "two": (64, 64), "two_b": (64, 64)})
    controls.mkdir()
    for i, (stem, size) in enumerate({"c1": (64, 64), "c2": (80, 48), "c3": (48, 48), "c4": (64, 64)}.items()):
        line_drawing(*size, seed=i).save(controls / f"{stem}.png")
    rows = {"none": [], "one": ["c1"], "one_b": ["c2"], "two": ["c1", "c3"], "two_b": ["c4", "c3"]}
    lines = []
    for stem, ctrl in rows.items():
        row = {"image_path": str(images / f"{stem}.png"), "caption": f"make {stem} red"}
        row.update({f"control_path_{i}": str(controls / f"{c}.png") for i, c in enumerate(ctrl)})
        lines.append(json.dumps(row))
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    return write_config(tmp_path / "d.toml", f"""
[[datasets]]
resolution = [64, 64]
batch_size = 2
image_jsonl_file = "{tmp_path / 'm.jsonl'}"
cache_directory = "{tmp_path / 'cache'}"
control_resolution = [48, 48]
""")


def _cache(cfg, family, tiny_files, kinds=("latents", "text")):
    out = []
    for kind in kinds:
        fn = cache_latents if kind == "latents" else cache_text
        kwargs = {"num_workers": 1} if kind == "latents" else {}
        out.append(fn(load_dataset_config(cfg), family, paths_of(family, tiny_files), CPU, **kwargs))
    return out


def test_control_latents_in_musubis_keys_read_bitwise_by_musubi_and_batches_homogeneous(musubi, tmp_path, jsonl_dataset,
                                                                                            tiny_files, tiny_models):
    family = EditFamily()
    lat, text = _cache(jsonl_dataset, family, tiny_files)
    assert (lat.cached, text.cached, lat.failed, text.failed) == (5, 5, [], [])
    cache = tmp_path / "cache"
    with safe_open(str(cache / "two_0064x0064_qie.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["latents_1x8x8_bfloat16", "latents_control_0_1x6x6_bfloat16",
                                    "latents_control_1_1x6x6_bfloat16"]  # control_resolution 48x48 -> 6x6 latents
        control = f.get_tensor("latents_control_1_1x6x6_bfloat16")
    # the control latent is the VAE's normalised mode of the control as sized (48x48 is already its bucket)
    vae = tiny_models["vae"]
    x = torch.from_numpy(np.array(Image.open(tmp_path / "controls/c3.png").convert("RGB"))).permute(2, 0, 1).float()
    with torch.no_grad():
        z = vae.encode((x / 255 * 2 - 1)[None, :, None]).latent_dist.mode()
    mean, std = (torch.tensor(v).view(1, 16, 1, 1, 1) for v in (vae.config.latents_mean, vae.config.latents_std))
    torch.testing.assert_close(control.float(), ((z - mean) / std)[0], atol=2e-2, rtol=1e-2)

    datasets = load_dataset_config(jsonl_dataset)
    items = scan_caches(datasets, family)
    plan = BatchPlan(items, datasets, seed=0)
    seen = {}
    for batch in make_loader(CacheDataset(items, family), plan, epoch=0):
        extras = batch["cond"].extra["latent_extras"]
        assert len({tuple(sorted((k, tuple(v.shape)) for k, v in e.items())) for e in extras}) == 1  # homogeneous
        for key, e in zip(batch["keys"], extras):
            seen[key] = e
    assert sorted(seen) == ["none", "one", "one_b", "two", "two_b"] and seen["none"] == {}
    assert sorted(seen["two"]) == ["latents_control_0_1x6x6", "latents_control_1_1x6x6"]

    m = musubi_datasets(jsonl_dataset, training=True)[0]
    m.prepare_for_training()
    manager = m.batch_manager
    theirs = {reso: sorted(it.item_key for it in b) for reso, b in manager.buckets.items()}
    ours = {key[1:]: sorted(items[i].key for i in members) for key, members in plan.groups.items()}
    assert {(tuple(r[:2]), *r[2:]): v for r, v in theirs.items()} == ours
    assert len(ours) == 4  # none | one | one_b (other shape) | two + two_b
    for idx in range(len(m)):
        batch = m[idx]
        reso, number = manager.bucket_batch_indices[idx]
        for i, item in enumerate(manager.buckets[reso][number * 2 : number * 2 + 2]):
            for name, tensor in seen[item.item_key].items():
                assert torch.equal(batch[name.rsplit("_", 1)[0]][i], tensor), (item.item_key, name)


def test_text_cache_sees_the_controls_as_cached_and_changes_make_caches_stale(tmp_path, jsonl_dataset, tiny_files):
    family = EditFamily()
    _cache(jsonl_dataset, family, tiny_files)
    calls = {p: im for c in family.encoder.calls for p, im in zip(c[0], c[1])}
    assert [im.size for im in calls["make two red"]] == [(48, 48), (48, 48)] and calls["make none red"] == []
    assert [im.size for im in calls["make one_b red"]] == [area_bucket(80, 48, (48, 48), 16)]
    with safe_open(str(tmp_path / "cache/two_0064x0064_qie.safetensors"), "pt") as f:
        control0 = f.get_tensor("latents_control_0_1x6x6_bfloat16")
    assert all(im.mode == "RGB" for im in calls["make two red"])
    te = read_provenance(open_checkpoint(tmp_path / "cache/two_qie_te.safetensors").metadata)
    assert te["control_rule"] == "area-48x48" and te["control_sizes"] == [[48, 48], [48, 48]]
    assert len(te["control_sources"]) == 2 and "sha256" in te["control_sources"][0]

    # a control's content changes: both caches of the items using it are recomputed, nothing else
    line_drawing(48, 48, seed=99).save(tmp_path / "controls/c3.png")
    family.encoder.calls.clear()
    lat, text = _cache(jsonl_dataset, family, tiny_files)
    assert (lat.cached, lat.fresh, text.cached, text.fresh) == (2, 3, 2, 3)
    assert dict(lat.stale_reasons) == dict(text.stale_reasons) == {"control image changed": 2}
    with safe_open(str(tmp_path / "cache/two_0064x0064_qie.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("latents_control_0_1x6x6_bfloat16"), control0)  # c1 unchanged
    # touched but unchanged: still fresh
    (tmp_path / "controls/c1.png").touch()
    lat, text = _cache(jsonl_dataset, family, tiny_files)
    assert (lat.cached, text.cached) == (0, 0)
    # the rule changes: every item with controls is recomputed
    jsonl_dataset.write_text(jsonl_dataset.read_text().replace("control_resolution = [48, 48]", "no_resize_control = true"))
    lat, text = _cache(jsonl_dataset, family, tiny_files)
    assert (lat.cached, text.cached) == (4, 4) and lat.stale_reasons["control_rule changed"] == 4
    # a control dropped from an item: its caches are stale too
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    rows[3].pop("control_path_1")
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lat, text = _cache(jsonl_dataset, family, tiny_files)
    assert (lat.cached, text.cached) == (1, 1) and dict(text.stale_reasons) == {"control_sizes changed": 1}


def test_text_cache_of_another_version_is_stale(tmp_path, jsonl_dataset, tiny_files):
    """The family's text_recipe is the version's (a v1 cache is stale for 2509): any change recomputes."""
    first, second = EditFamily(), EditFamily()
    _cache(jsonl_dataset, first, tiny_files, ("text",))
    second.text_recipe = lambda: "another version's template"
    text, = _cache(jsonl_dataset, second, tiny_files, ("text",))
    assert text.cached == 5 and dict(text.stale_reasons) == {"recipe changed": 5}


def test_control_counts_and_unreadable_controls(tmp_path, tiny_files):
    images, controls = tmp_path / "images", tmp_path / "controls"
    _targets(images, {"many": (64, 64), "bad": (64, 64), "ok": (64, 64)})
    for stem in ("many", "many_1", "many_2", "many_3", "ok"):
        write_item(controls, stem, noise_image(64, 64), None)
    (controls / "bad.jpg").write_bytes(truncated_jpeg())
    cfg = write_config(tmp_path / "d.toml", f'[[datasets]]\nresolution = 64\nimage_directory = "{images}"\n'
                                            f'control_directory = "{controls}"\n')
    lat, text = _cache(cfg, EditFamily(3), tiny_files)
    for summary in (lat, text):
        failed = {p.name: reason for p, reason in summary.failed}
        assert failed["many.png"] == "4 control images, but this model takes at most 3; remove many_3.png"
        assert failed["bad.png"].startswith(f"control image {controls / 'bad.jpg'}: corrupt or truncated")
        assert summary.cached == 1 and "\n" not in "".join(summary.lines())
    assert sorted(p.name for p in (images).glob("*.safetensors")) == ["ok_0064x0064_qie.safetensors", "ok_qie_te.safetensors"]

    one = EditFamily(1)  # a one-image model uses the first control and warns once (musubi-tuner's behaviour)
    lat, = _cache(cfg, one, tiny_files, ("latents",))
    assert [w for w in lat.warnings if "more than one control" in w] == lat.warnings and len(lat.warnings) == 1
    with safe_open(str(images / "many_0064x0064_qie.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["latents_1x8x8_bfloat16", "latents_control_0_1x8x8_bfloat16"]

    t2i = QwenImageFamily()  # no controls read: one warning per dataset, caches without control tensors
    lat, = _cache(cfg, t2i, tiny_files, ("latents",))
    assert lat.failed == [] and len(lat.warnings) == 1 and "this model takes none: they are ignored" in lat.warnings[0]
    with safe_open(str(images / "bad_0064x0064_qi.safetensors"), "pt") as f:
        assert list(f.keys()) == ["latents_1x8x8_bfloat16"]
    assert "control_sizes" not in read_provenance(open_checkpoint(images / "ok_0064x0064_qi.safetensors").metadata)


# ---------------------------------------------------------------------------------------------- doctor

def test_doctor_names_targets_with_bad_controls(tmp_path):
    images, controls = tmp_path / "images", tmp_path / "controls"
    _targets(images, {n: (64, 64) for n in ("missing", "broken", "clear", "deep", "cmyk", "many", "fine")})
    controls.mkdir()
    (controls / "broken.png").write_bytes(truncated_jpeg())
    line_drawing(64, 64, "RGBA").save(controls / "clear.png")
    Image.fromarray((np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)).save(controls / "deep.png")
    line_drawing(64, 64, "CMYK").save(controls / "cmyk.jpg")
    for stem in ("many", "many_0", "many_1", "many_2", "fine"):
        write_item(controls, stem, noise_image(64, 64), None)
    cfg = write_config(tmp_path / "d.toml", f'[[datasets]]\nresolution = 64\nimage_directory = "{images}"\n'
                                            f'control_directory = "{controls}"\n')
    ds = load_dataset_config(cfg)[0]
    estimate = QwenImageFamily().cache_size_estimate
    report = check_dataset(ds, 16, estimate, 1, max_controls=3)
    lines = [str(p) for p in report.problems]
    expect = {
        ("warning", "missing.png"): "no control image in",
        ("error", "broken.png"): f"control image {controls / 'broken.png'}: ",
        ("warning", "clear.png"): "has transparent pixels: the alpha channel is dropped",
        ("warning", "deep.png"): "16-bit values scaled to 8 bits (x/257); musubi-tuner clips them at 255",
        ("warning", "cmyk.png"): "CMYK: converted to RGB without a colour profile",
        ("error", "many.png"): "4 control images, but this model takes at most 3",
    }
    for (severity, name), text in expect.items():
        assert [line for line in lines if line.startswith(f"{severity}: {images / name}: ") and text in line], (name, lines)
    assert not [line for line in lines if "fine.png" in line] and report.errors == 2
    single = check_dataset(ds, 16, estimate, 1, max_controls=0)
    assert [str(p) for p in single.problems if "ignored" in str(p)] == [
        f"warning: {controls}: 6 items have control images (e.g. {controls / 'broken.png'}); this model takes none: they are "
        "ignored, as musubi-tuner's text-to-image caching ignores them"]
    assert report.latent_bytes > single.latent_bytes  # control latents counted in the estimate
