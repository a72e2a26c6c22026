"""Samples/s of the training loader reading cache shards from S3 (moto's server on loopback) against the same
caches as local files. Goal: >= 0.8x local. Through the local shards cache (data/streaming.py, the default):
the first epoch (cold: each data file is fetched whole with one GET, a thread fetching the next batches' files
ahead) and the second (warm: every file local) are timed separately. --direct also times reading straight from
the store (`shards_cache = "none"`), which every epoch does with ranged GETs.

Writes N synthetic 1024x1024 cache pairs (bench/cache_loader.py's), `write_shards` them to s3://bench/x,
then times `make_loader` over both. moto's server answers a ranged GET by copying the whole object
(measured: a 1 MB range of a 64 MB object takes 61 ms, of a 4 MB object 8 ms), so --file_mb 4 shows what a
store with range reads costing O(range), as S3 / R2 / MinIO, does. Needs pip install -e '.[test]' (pylance, moto[server]).

    python bench/streaming_loader.py [--items 64] [--batch_size 2] [--workers 2] [--file_mb 64] [--direct] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from cache_loader import write_caches  # noqa: E402

from flowtuner.data.config import load_dataset_config  # noqa: E402
from flowtuner.data.loader import BatchPlan, CacheDataset, make_loader, scan_caches  # noqa: E402
from flowtuner.data import streaming  # noqa: E402
from flowtuner.data.streaming import write_shards  # noqa: E402
from flowtuner.families.qwen_image import QwenImageFamily  # noqa: E402


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("moto's server did not start within 30 s")
            time.sleep(0.1)


def rate(data, plan, epoch: int, workers: int) -> float:
    t = time.perf_counter()
    n = sum(len(b["keys"]) for b in make_loader(data, plan, epoch, num_workers=workers))
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--batch_size", type=int, default=2)
    ap.add_argument("--file_mb", type=int, default=64, help="shard data file size (flowtuner writes 64)")
    ap.add_argument("--workers", type=int, default=2, help="reader threads (--max_data_loader_n_workers)")
    ap.add_argument("--direct", action="store_true", help="also time reads straight from the store (no local cache)")
    ap.add_argument("--repeats", type=int, default=5, help="cold + warm epochs timed this many times (medians, bests)")
    args = ap.parse_args()
    import boto3

    proc, endpoint = start_moto()
    os.environ.update(S3_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1")
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        with tempfile.TemporaryDirectory() as tmp:
            cfg = write_caches(Path(tmp), args.items, args.batch_size)
            family, datasets = QwenImageFamily(), load_dataset_config(cfg)
            t = time.perf_counter()
            write_shards(datasets, family, "s3://bench/x", args.file_mb << 20)
            print(f"write_shards: {args.items} items in {time.perf_counter() - t:.1f} s")
            local_items = scan_caches(datasets, family)
            local = (CacheDataset(local_items, family), BatchPlan(local_items, datasets, 0))
            for cache in ([Path(tmp) / "shards-cache"] + (["none"] if args.direct else [])):
                shard_cfg = Path(tmp) / "shards.toml"
                shard_cfg.write_text(f'[general]\nresolution = 1024\nbatch_size = {args.batch_size}\n'
                                     f'shards_cache = "{cache}"\n[[datasets]]\nshards = "s3://bench/x"\n')
                how = "direct from S3" if cache == "none" else "S3 via cache"
                got = {0: [], 1: []}  # epoch -> [(local, shards)] per repeat
                for _ in range(args.repeats):  # each repeat starts cold: an empty cache, a new process's view
                    if cache != "none":
                        shutil.rmtree(cache, ignore_errors=True)
                    streaming._STORES.clear()
                    shard_ds = load_dataset_config(shard_cfg)
                    t = time.perf_counter()
                    shard_items = scan_caches(shard_ds, family)
                    scan_s = time.perf_counter() - t
                    shards = (CacheDataset(shard_items, family), BatchPlan(shard_items, shard_ds, 0))
                    for epoch in (0, 1):  # local first, then shards, in each: the same load drift for both
                        got[epoch].append((rate(*local, epoch, args.workers), rate(*shards, epoch, args.workers)))
                print(f"{how}: index scan {scan_s:.2f} s (last repeat); samples/s over {args.repeats} repeats, "
                      "the ratio of the medians and, in brackets, of the best")
                for epoch, name in ((0, "first epoch (cold)"), (1, "second epoch (warm)")):
                    lr, sr = (statistics.median(x) for x in zip(*got[epoch]))
                    lb, sb = (max(x) for x in zip(*got[epoch]))
                    print(f"  {name}: local caches {lr:7.1f} (best {lb:7.1f}), {how} {sr:7.1f} (best {sb:7.1f})  "
                          f"x{sr / lr:.2f} [x{sb / lb:.2f}]")
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
