"""Cache shards (data/streaming.py) against a real S3-compatible server: moto's server mode, started here as a
subprocess on a free loopback port and stopped after. `--to_shards` writes them, training reads them, and the
weights equal training from the local caches; the local shards cache makes a warm run GET no data file, evicts
beyond its limit and re-fetches a damaged copy; an unreachable store is one line after bounded retries."""

from __future__ import annotations

import json
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
RECORDINGS: dict[str, Path] = {}  # server URL -> the file moto's recorder appends each request to


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """http://127.0.0.1:PORT of a moto S3 server holding an empty bucket; it can record the requests it serves
    (moto's recorder, see `requests_made`)."""
    try:
        import boto3
        import lance  # noqa: F401 - the library the shards are written with
        import moto.server  # noqa: F401
    except ModuleNotFoundError as exc:
        missing(f"{exc.name} is not installed (pip install -e '.[test]')")
    port = free_port()
    env = {**os.environ, "MOTO_RECORDER_FILEPATH": str(tmp_path_factory.mktemp("moto") / "requests.jsonl")}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    RECORDINGS[f"http://127.0.0.1:{port}"] = Path(env["MOTO_RECORDER_FILEPATH"])
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


def shards_config(path: Path, url: str, extra: str = "") -> Path:
    """The dataset config a training machine without the images uses: the bucket settings and the shards."""
    return write_config(path, f"""
[general]
resolution = [64, 64]
enable_bucket = true
batch_size = 2
{extra}

[[datasets]]
shards = "{url}"
""")


@pytest.fixture(autouse=True)
def fresh_process_state():
    """Each training run here opens its shards as a new process would (the stores are kept per process)."""
    from flowtuner.data import streaming

    yield
    streaming._OPEN.clear()
    streaming._STORES.clear()


def data_gets(server: str, run) -> list[tuple[str, str]]:
    """(data file name, User-Agent) of each GET of a Lance data file (`data/*.lance`) that `run()` makes; run()
    must return 0 (a command's exit status)."""
    import urllib.request

    for action in ("reset-recording", "start-recording"):
        urllib.request.urlopen(urllib.request.Request(f"{server}/moto-api/recorder/{action}", method="POST")).read()
    try:
        assert run() == 0
    finally:
        urllib.request.urlopen(urllib.request.Request(f"{server}/moto-api/recorder/stop-recording", method="POST")).read()
    entries = [json.loads(line) for line in RECORDINGS[server].read_text().splitlines() if line.strip()]
    gets = []
    for e in entries:
        path = e["url"].split("?")[0]
        if e["method"] == "GET" and "/data/" in path and path.endswith(".lance"):
            gets.append((path.rsplit("/", 1)[1], next((v for k, v in e["headers"].items() if k.lower() == "user-agent"), "")))
    return gets


def whole(gets) -> list[str]:
    """The data files the shards cache fetched (whole, with pyarrow's S3 client: the AWS C++ SDK), as opposed to
    Lance's own reads (the index columns of a file not cached yet; User-Agent pylance/...)."""
    return [name for name, agent in gets if agent.startswith("aws-sdk-cpp")]


def fresh(run):
    """run(), then forget the open stores, as the end of a process does."""
    from flowtuner.data import streaming

    try:
        return run()
    finally:
        streaming._OPEN.clear()
        streaming._STORES.clear()


def train(cfg: Path, tiny_files, out: Path, *extra) -> int:
    return main(["train", "--dataset_config", str(cfg), "--model", str(tiny_files["repo"]), "--device", "cpu",
                 "--output_dir", str(out), "--seed", "3", "--learning_rate", "1e-3", "--network_dim", "2",
                 "--max_train_steps", "2", *extra])


def assert_same_lora(a: Path, b: Path) -> None:
    x, y = load_file(str(a / "lora.safetensors")), load_file(str(b / "lora.safetensors"))
    assert x.keys() == y.keys()
    assert any(v.abs().sum() > 0 for k, v in x.items() if "lora_up" in k)  # it trained
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_lora_trained_from_s3_shards_equals_training_from_the_local_caches(tmp_path, cached, tiny_files, s3_env, capsys):
    url = f"s3://{BUCKET}/x"
    assert main(["cache-text", "--dataset_config", str(cached), "--model", str(tiny_files["repo"]), "--device", "cpu",
                 "--to_shards", url]) == 0
    assert f"shards: 6 items written to {url}" in capsys.readouterr().out
    assert train(cached, tiny_files, tmp_path / "local", "--max_data_loader_n_workers", "0") == 0
    cache = tmp_path / "shards-cache"
    cfg = shards_config(tmp_path / "s3.toml", url, f'shards_cache = "{cache}"')
    # reader threads over the store, through the local cache: the same batches in the same order
    cold = data_gets(s3_env, lambda: fresh(lambda: train(cfg, tiny_files, tmp_path / "s3", "--max_data_loader_n_workers", "2")))
    assert_same_lora(tmp_path / "local", tmp_path / "s3")
    files = sorted((cache).glob("*/data/*.rows"))
    assert len(files) == 1 and len(whole(cold)) == 1  # one data file (6 small rows), fetched whole with one GET
    # warm: a new run reads the local copy (and the index it kept) and GETs no data file
    warm = data_gets(s3_env, lambda: fresh(lambda: train(cfg, tiny_files, tmp_path / "warm", "--max_data_loader_n_workers", "0")))
    assert warm == []
    assert_same_lora(tmp_path / "local", tmp_path / "warm")
    # a partial copy (an interrupted write outside flowtuner's temp + rename, a full disk) is fetched again
    files[0].write_bytes(files[0].read_bytes()[:-100])
    again = data_gets(s3_env, lambda: fresh(lambda: train(cfg, tiny_files, tmp_path / "again", "--max_data_loader_n_workers", "2")))
    assert len(whole(again)) == 1
    assert_same_lora(tmp_path / "local", tmp_path / "again")


def test_a_cache_limit_below_the_dataset_evicts_and_trains_the_same(tmp_path, cached, tiny_files, s3_env):
    from flowtuner.data import streaming
    from flowtuner.data.config import load_dataset_config
    from flowtuner.data.loader import scan_caches
    from flowtuner.families import get_family

    url = f"s3://{BUCKET}/small-files"
    # one row per data file: 6 files, so the plan's batches need several and the limit holds two
    streaming.write_shards(load_dataset_config(cached), get_family("qwen_image"), url, file_bytes=1)
    assert len(fresh(lambda: streaming.shard_store(url, "none").files)) == 6
    # the cache holds each data file's rows unpacked (RowsFile): its header, then key, latent and text bytes
    rows = [8 + 8 + 8 * 4 + len(it.key.encode()) + it.latent.stat().st_size + it.text.stat().st_size
            for it in scan_caches(load_dataset_config(cached), get_family("qwen_image"))]
    assert 3 * min(rows) > 2 * max(rows)
    assert train(cached, tiny_files, tmp_path / "local", "--max_data_loader_n_workers", "0", "--max_train_steps", "3") == 0
    cache, limit = tmp_path / "shards-cache", 2 * max(rows)
    cfg = shards_config(tmp_path / "s3.toml", url, f'shards_cache = "{cache}"\nshards_cache_limit = {limit}')
    got = data_gets(s3_env, lambda: fresh(lambda: train(cfg, tiny_files, tmp_path / "s3", "--max_data_loader_n_workers", "2",
                                                        "--max_train_steps", "3")))
    assert_same_lora(tmp_path / "local", tmp_path / "s3")
    left = list(cache.glob("*/data/*.rows"))
    assert sum(f.stat().st_size for f in left) <= limit and len(left) <= 2
    assert len(set(whole(got))) > 2  # it fetched more files than the limit holds: some were evicted


def test_shards_cache_keys_are_checked(tmp_path):
    from flowtuner.data.config import load_dataset_config
    from flowtuner.errors import ConfigError

    ds = load_dataset_config(shards_config(tmp_path / "a.toml", "s3://b/x", 'shards_cache_limit = "1.5GB"'))[0]
    assert ds.shards_cache is None and ds.shards_cache_limit == 1_500_000_000
    ds = load_dataset_config(shards_config(tmp_path / "b.toml", "s3://b/x", 'shards_cache = "none"\nshards_cache_limit = 4096'))[0]
    assert ds.shards_cache == "none" and ds.shards_cache_limit == 4096
    with pytest.raises(ConfigError, match="shards_cache_limit '20 parsecs': give bytes or a size"):
        load_dataset_config(shards_config(tmp_path / "c.toml", "s3://b/x", 'shards_cache_limit = "20 parsecs"'))


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


def test_rows_across_fragments_are_read_in_order(tmp_path, cached):
    """fetch() reads each fragment's rows from the fragment (ShardStore._take): rows of several fragments, in any
    order and repeated, come back as the rows asked for, byte for byte the local cache files."""
    from flowtuner.data import streaming
    from flowtuner.data.config import load_dataset_config
    from flowtuner.data.loader import scan_caches
    from flowtuner.families import get_family

    family, datasets = get_family("qwen_image"), load_dataset_config(cached)
    url = str(tmp_path / "one-row-per-file")
    streaming.write_shards(datasets, family, url, file_bytes=1)
    store = fresh(lambda: streaming.shard_store(url))
    assert len(store.files) == 6
    local = {it.key: it for it in scan_caches(datasets, family)}
    keys = store.remote.to_table(columns=["key"]).column("key").to_pylist()
    for rows in ([0, 1, 2, 3, 4, 5], [5, 0, 3], [4, 4, 1], [2]):
        got = fresh(lambda: streaming.fetch(url, rows))  # noqa: B023
        for row, (lat, txt) in zip(rows, got, strict=True):
            assert bytes(lat.data) == local[keys[row]].latent.read_bytes()
            assert bytes(txt.data) == local[keys[row]].text.read_bytes()


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
