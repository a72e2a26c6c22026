"""Cache shards (data/streaming.py) against a real S3-compatible server: moto's server mode, started here as a
subprocess on a free loopback port and stopped after. `--to_shards` writes them, training reads them, and the
weights equal training from the local caches; an unreachable store is one line after bounded retries."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowtuner.cli import main
from tests.datasets import good_dataset, write_config
from tests.shared import missing

BUCKET = "flowtuner-shards"
SERVER_START_S = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    """http://127.0.0.1:PORT of a moto S3 server holding an empty bucket."""
    try:
        import boto3
        import lance  # noqa: F401 - the library the shards are written with
        import moto.server  # noqa: F401
    except ModuleNotFoundError as exc:
        missing(f"{exc.name} is not installed (pip install -e '.[test]')")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                assert proc.poll() is None, "moto's server exited at start"
                assert time.monotonic() < deadline, f"moto's server did not listen within {SERVER_START_S} s"
                time.sleep(0.1)
        boto3.client("s3", endpoint_url=url, aws_access_key_id="test", aws_secret_access_key="test",
                     region_name="us-east-1").create_bucket(Bucket=BUCKET)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for key in ("AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("S3_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return s3_server


@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny_files):
    """A tiny dataset with latent and text caches: 2 buckets, batch_size 2."""
    root = tmp_path_factory.mktemp("stream")
    cfg = good_dataset(root, sizes=[(64, 64)] * 3 + [(96, 64)] * 3)
    for kind in ("latents", "text"):
        assert main([f"cache-{kind}", "--dataset_config", str(cfg), "--model", str(tiny_files["repo"]), "--device", "cpu"]) == 0
    return cfg


def shards_config(path: Path, url: str) -> Path:
    """The dataset config a training machine without the images uses: the bucket settings and the shards."""
    return write_config(path, f"""
[general]
resolution = [64, 64]
enable_bucket = true
batch_size = 2

[[datasets]]
shards = "{url}"
""")


def train(cfg: Path, tiny_files, out: Path, *extra) -> int:
    return main(["train", "--dataset_config", str(cfg), "--model", str(tiny_files["repo"]), "--device", "cpu",
                 "--output_dir", str(out), "--seed", "3", "--learning_rate", "1e-3", "--network_dim", "2",
                 "--max_train_steps", "2", *extra])


def test_lora_trained_from_s3_shards_equals_training_from_the_local_caches(tmp_path, cached, tiny_files, s3_env, capsys):
    url = f"s3://{BUCKET}/x"
    assert main(["cache-text", "--dataset_config", str(cached), "--model", str(tiny_files["repo"]), "--device", "cpu",
                 "--to_shards", url]) == 0
    assert f"shards: 6 items written to {url}" in capsys.readouterr().out
    assert train(cached, tiny_files, tmp_path / "local", "--max_data_loader_n_workers", "0") == 0
    # reader threads over the store: the same batches in the same order
    assert train(shards_config(tmp_path / "s3.toml", url), tiny_files, tmp_path / "s3", "--max_data_loader_n_workers", "2") == 0
    local, streamed = load_file(str(tmp_path / "local/lora.safetensors")), load_file(str(tmp_path / "s3/lora.safetensors"))
    assert local.keys() == streamed.keys()
    assert any(v.abs().sum() > 0 for k, v in local.items() if "lora_up" in k)  # it trained
    assert all(torch.equal(local[k], streamed[k]) for k in local)


def test_a_local_folder_target_gives_the_batches_of_the_local_caches(tmp_path, cached, tiny_files):
    from flowtuner.data.config import load_dataset_config
    from flowtuner.data.loader import BatchPlan, CacheDataset, scan_caches
    from flowtuner.families import get_family

    folder = tmp_path / "shards"
    assert main(["cache-latents", "--dataset_config", str(cached), "--model", str(tiny_files["repo"]), "--device", "cpu",
                 "--to_shards", str(folder)]) == 0
    family = get_family("qwen_image")
    local_ds, shard_ds = load_dataset_config(cached), load_dataset_config(shards_config(tmp_path / "d.toml", str(folder)))
    local_items, shard_items = scan_caches(local_ds, family), scan_caches(shard_ds, family)
    assert all(it.stream == str(folder) for it in shard_items)
    local_plan, shard_plan = BatchPlan(local_items, local_ds, 7), BatchPlan(shard_items, shard_ds, 7)
    a, b = CacheDataset(local_items, family), CacheDataset(shard_items, family)
    for lb, sb in zip(local_plan.epoch(1), shard_plan.epoch(1), strict=True):
        x, y = a[lb], b[sb]
        assert x["keys"] == y["keys"]
        assert torch.equal(x["latents"], y["latents"])
        for name, t in vars(x["cond"]).items():
            if isinstance(t, torch.Tensor):
                assert torch.equal(t, getattr(y["cond"], name)), name


def test_an_unreachable_store_is_one_line_after_bounded_retries_and_no_checkpoint(tmp_path, cached, tiny_files, monkeypatch,
                                                                                  capsys):
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    pytest.importorskip("lance")
    started = time.monotonic()
    out = tmp_path / "out"
    assert train(shards_config(tmp_path / "s3.toml", f"s3://{BUCKET}/x"), tiny_files, out) == 2
    took = time.monotonic() - started
    err = capsys.readouterr().err.strip()
    assert "cannot reach the store after 3 retries" in err and "S3_ENDPOINT_URL" in err, err
    assert "\n" not in err and "Traceback" not in err
    assert took < 60, f"gave up after {took:.0f} s"
    assert not list(out.glob("*.safetensors")) and not list(out.glob("*-state"))


def test_shards_that_are_not_there_or_not_ours_are_one_line_errors(tmp_path, cached, tiny_files, capsys):
    pytest.importorskip("lance")
    assert train(shards_config(tmp_path / "d.toml", str(tmp_path / "nothing")), tiny_files, tmp_path / "o") == 2
    assert "no such folder; write it with cache-latents/cache-text --to_shards" in capsys.readouterr().err
