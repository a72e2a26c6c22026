"""Dataset config: musubi-tuner's schema, value lookup order, and one-line errors for bad configs."""

from __future__ import annotations

import json
import logging

import pytest

from flowtuner.data.config import load_dataset_config
from flowtuner.errors import ConfigError
from tests.datasets import write_config


@pytest.fixture
def folders(tmp_path):
    for name in ("a", "b", "ctrl"):
        (tmp_path / name).mkdir()
    return tmp_path


def test_musubi_example_and_lookup_order(folders):
    cfg = write_config(folders / "d.toml", f"""
[general]
resolution = [960, 544]
caption_extension = ".caption"
batch_size = 4
enable_bucket = true

[[datasets]]
image_directory = "{folders / 'a'}"
cache_directory = "{folders / 'cache_a'}"
num_repeats = 3
control_directory = "{folders / 'ctrl'}"
qwen_image_edit_control_resolution = [1024, 1024]

[[datasets]]
image_directory = "{folders / 'b'}"
resolution = 512
batch_size = 1
""")
    a, b = load_dataset_config(cfg, fallbacks={"batch_size": 7, "num_repeats": 9})
    assert (a.resolution, a.caption_extension, a.batch_size, a.num_repeats, a.enable_bucket) == ((960, 544), ".caption", 4, 3, True)
    assert a.control_resolution == (1024, 1024) and a.control_directory == folders / "ctrl"
    assert (b.resolution, b.batch_size, b.num_repeats, b.cache_directory) == ((512, 512), 1, 9, folders / "b")
    assert not b.bucket_no_upscale


def test_json_config_and_defaults(folders):
    cfg = folders / "d.json"
    cfg.write_text(json.dumps({"datasets": [{"image_directory": str(folders / "a")}]}))
    (ds,) = load_dataset_config(cfg)
    assert ds.resolution == (960, 544) and ds.caption_extension == ".txt" and ds.batch_size == 1


@pytest.mark.parametrize("body,message", [
    ('[[datasets]]\nimage_dir = "a"\n', "unknown key 'image_dir'; did you mean 'image_directory'?"),
    ('[general]\nresoluton = 512\n[[datasets]]\nimage_directory = "a"\n', "[general]: unknown key 'resoluton'; did you mean 'resolution'?"),
    ('[[datasets]]\nimage_directory = "missing"\n', "image_directory"),
    ('[[datasets]]\nimage_directory = "a"\ncache_directory = "c"\n[[datasets]]\nimage_directory = "b"\ncache_directory = "c"\n',
     "#1 and #2 share cache_directory"),
    ('[[datasets]]\nimage_directory = "a"\nbatch_size = "4"\n', "'batch_size' must be an integer"),
    ('[[datasets]]\nimage_directory = "a"\nresolution = [1, 2, 3]\n', "'resolution' must be an int or [W, H]"),
    ('[[datasets]]\nresolution = 512\n', "give 'image_directory' or 'image_jsonl_file'"),
    ('[[datasets]]\nimage_jsonl_file = "a"\ncache_directory = "c"\n', "image_jsonl_file"),
    ('[[datasets]]\nvideo_directory = "a"\n', "video datasets are not supported"),
    ('[general\nresolution = 5\n', "invalid TOML"),
    ('[general]\nresolution = 512\n', "no [[datasets]] entries"),
])
def test_bad_configs(folders, monkeypatch, body, message):
    monkeypatch.chdir(folders)
    cfg = write_config(folders / "bad.toml", body)
    with pytest.raises(ConfigError) as err:
        load_dataset_config(cfg)
    assert message in str(err.value) and str(cfg) in str(err.value)
    assert "\n" not in str(err.value)


def test_jsonl_needs_cache_directory_and_reports_bad_lines(folders, monkeypatch):
    from flowtuner.data.sources import collect_items

    monkeypatch.chdir(folders)

    jsonl = folders / "meta.jsonl"
    jsonl.write_text('{"image_path": "a/x.png", "caption": "x"}\n{not json}\n')
    with pytest.raises(ConfigError, match="'cache_directory' is required"):
        load_dataset_config(write_config(folders / "j.toml", f'[[datasets]]\nimage_jsonl_file = "{jsonl}"\n'))
    (ds,) = load_dataset_config(write_config(folders / "j.toml", f'[[datasets]]\nimage_jsonl_file = "{jsonl}"\ncache_directory = "c"\n'))
    with pytest.raises(ConfigError, match=r"meta.jsonl:2: not valid JSON"):
        collect_items(ds)


def test_directory_and_jsonl_both_given_directory_wins_with_one_warning(folders, caplog):
    jsonl = folders / "meta.jsonl"
    jsonl.write_text('{"image_path": "x.png", "caption": "x"}\n')
    cfg = write_config(folders / "d.toml", f'[[datasets]]\nimage_directory = "{folders / "a"}"\nimage_jsonl_file = "{jsonl}"\n')
    with caplog.at_level(logging.WARNING):
        (ds,) = load_dataset_config(cfg)
    assert ds.image_directory == folders / "a" and ds.image_jsonl_file is None and ds.cache_directory == folders / "a"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "image_directory is used and the JSONL ignored, as musubi-tuner does" in warnings[0]


def test_relative_paths_resolve_against_the_working_directory_logged_once(folders, tmp_path_factory, monkeypatch, caplog):
    """musubi-tuner opens these strings as given, i.e. relative to where the command runs, not to the config."""
    work = tmp_path_factory.mktemp("work")
    (work / "imgs").mkdir()
    (work / "ctrl").mkdir()
    (folders / "cache").mkdir()  # beside the config: an earlier flowtuner wrote here; not used now
    monkeypatch.chdir(work)
    cfg = write_config(folders / "d.toml", '[[datasets]]\nimage_directory = "imgs"\ncache_directory = "cache"\n'
                                           'control_directory = "ctrl"\n')
    with caplog.at_level(logging.INFO, logger="flowtuner.data.config"):
        (ds,) = load_dataset_config(cfg)
        load_dataset_config(cfg)
    assert (ds.image_directory, ds.cache_directory, ds.control_directory) == (work / "imgs", work / "cache", work / "ctrl")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and all("relative paths resolve against the working directory" in x for x in lines)
    assert f"cache_directory 'cache' is {work / 'cache'}" in lines[1]
    assert f"{folders / 'cache'} (beside the config) is not used" in lines[1]
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    with pytest.raises(ConfigError, match=rf"image_directory .* does not exist; .* and {work / 'imgs'} exists") as err:
        load_dataset_config(write_config(work / "d.toml", '[[datasets]]\nimage_directory = "imgs"\n'))
    assert "\n" not in str(err.value)


def test_deprecated_alias_warns(folders, caplog):
    cfg = write_config(folders / "d.toml", f'[[datasets]]\nimage_directory = "{folders / "a"}"\nqwen_image_edit_no_resize_control = true\n')
    with caplog.at_level(logging.WARNING):
        (ds,) = load_dataset_config(cfg)
    assert ds.no_resize_control and "deprecated; use 'no_resize_control'" in caplog.text


def test_docs_list_every_dataset_key_with_its_default():
    """The dataclasses are the schema; the docs table must not drift from them."""
    import dataclasses
    from pathlib import Path

    from flowtuner.data.config import DatasetSettings

    docs = (Path(__file__).resolve().parents[1] / "docs" / "datasets.md").read_text()
    for f in dataclasses.fields(DatasetSettings):
        assert f"| `{f.name}` |" in docs, f.name
    assert "| `resolution` | general, dataset | `[960, 544]` |" in docs


def test_jsonl_items_controls_and_missing_captions(folders, monkeypatch):
    from flowtuner.data.sources import collect_items
    from tests.datasets import noise_image

    monkeypatch.chdir(folders)
    for name in ("t1", "t2", "c0", "c1", "c2", "c10"):
        noise_image(16, 16).save(folders / "a" / f"{name}.png")
    lines = [
        {"image_path": "a/t1.png", "caption": "one", "control_path_10": "a/c10.png", "control_path_2": "a/c2.png",
         "control_path": "a/c0.png", "control_path_1": "a/c1.png"},
        {"image_path": str(folders / "a/t2.png"), "caption": "  "},
    ]
    jsonl = folders / "meta.jsonl"
    jsonl.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    cfg = write_config(folders / "j.toml", f'[[datasets]]\nimage_jsonl_file = "{jsonl}"\ncache_directory = "cache"\n')
    (ds,) = load_dataset_config(cfg)
    items, problems = collect_items(ds)
    assert [p.name for p in items[0].controls] == ["c0.png", "c1.png", "c2.png", "c10.png"]
    assert items[0].caption == "one" and items[1].caption is None
    assert any("missing or empty caption (meta.jsonl:2)" in str(p) for p in problems)
