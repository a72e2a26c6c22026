"""Cache shards in object storage: `--to_shards URL` writes the caches of a dataset config into one Lance
dataset (a local folder or s3://bucket/prefix); a dataset config with `shards = URL` trains from it.

Why Lance (docs/scale.md "Streaming"): flowtuner's BatchPlan decides the order (bucket-homogeneous
micro-batches, a function of (seed, epoch), dealt to ranks), so the store must give random access by row
without a shuffle of its own. Lance's `take(rows)` reads just the byte ranges of those rows from any
fragment, so a globally shuffled bucketed plan reads no more than it trains on; mosaicml-streaming cannot
be installed beside flowtuner (it pins numpy < 2.2 and transformers < 5), and LitData pulls torchvision
and a CUDA torch.

One row per item: its key, the [[datasets]] entry it came from, its bucket, the original image size, the
shapes BatchPlan groups by, the control latents' names, and the two cache files as they are on disk
(safetensors bytes: every tensor with its dtype and shape, musubi-tuner's metadata and flowtuner's
provenance), plus the provenance as JSON for queries. Rows are sorted by (dataset, bucket, group, key), so a
micro-batch's rows lie together.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
from pathlib import Path

import torch

from flowtuner.data.cache import read_provenance
from flowtuner.errors import ConfigError, FlowtunerError
from flowtuner.weights.reader import DTYPES, open_checkpoint

log = logging.getLogger(__name__)

FORMAT = "flowtuner-cache-shards/1"
ROWS_PER_WRITE = 64  # rows buffered per record batch while writing (memory, not layout)
# one data file (fragment) per ~64 MB of rows, MDS's default shard size: small enough that a store's per-object
# costs stay low, large enough that 13 M items are ~10^5 objects, not 10^7
FILE_BYTES = 64 << 20
# Lance's file format 2.0: `take` of large binary rows measured 3-4x faster than 2.1's (bench, docs/scale.md)
FILE_VERSION = "2.0"
# bounded retries (object_store's client options): an unreachable store fails after about
# CONNECT_TIMEOUT x (MAX_RETRIES + 1) s instead of object_store's default 10 retries over 180 s
MAX_RETRIES, RETRY_TIMEOUT_S, CONNECT_TIMEOUT_S, REQUEST_TIMEOUT_S = 3, 15, 2, 60


class StreamError(FlowtunerError):
    """A shard store that cannot be read or written."""


def _lance():
    # Lance's Rust log goes straight to stderr (e.g. a WARN that a new dataset is created); flowtuner reports
    # failures itself, one line each. A level the user set is kept.
    os.environ.setdefault("LANCE_LOG", "error")
    try:
        import lance
    except ModuleNotFoundError:
        raise ConfigError("streaming shards need the Lance library: pip install 'flowtuner[streaming]' (pylance).") from None
    return lance


def is_remote(url: str) -> bool:
    return "://" in url


def storage_options(url: str) -> dict[str, str]:
    """object_store options from the standard variables: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, the endpoint
    from S3_ENDPOINT_URL (as bigASP and mosaicml-streaming read it) or AWS_ENDPOINT_URL, the region from AWS_REGION /
    AWS_DEFAULT_REGION; path-style addressing (what S3-compatible stores such as R2 and MinIO expect)."""
    if not url.startswith("s3://"):
        if is_remote(url):
            raise ConfigError(f"shards {url}: only local folders and s3:// URLs are supported.")
        return {}
    opts = {"client_max_retries": str(MAX_RETRIES), "client_retry_timeout": str(RETRY_TIMEOUT_S),
            "connect_timeout": f"{CONNECT_TIMEOUT_S}s", "timeout": f"{REQUEST_TIMEOUT_S}s",
            "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
    endpoint = os.environ.get("S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts.update(endpoint=endpoint, virtual_hosted_style_request="false")
        if endpoint.startswith("http://"):
            opts["allow_http"] = "true"
    for env, key in (("AWS_ACCESS_KEY_ID", "aws_access_key_id"), ("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key"),
                     ("AWS_SESSION_TOKEN", "aws_session_token")):
        if os.environ.get(env):
            opts[key] = os.environ[env]
    return opts


def _unreachable(url: str, exc: Exception) -> StreamError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return StreamError(f"shards {url}: cannot reach the store after {MAX_RETRIES} retries ({first[:200]}); check the URL, "
                       "S3_ENDPOINT_URL / AWS_ENDPOINT_URL and the AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY credentials.")


# --- writing -------------------------------------------------------------------------------------------------

def _schema(arch: str, datasets: int):
    import pyarrow as pa

    fields = [("key", pa.string()), ("dataset", pa.int32()), ("bucket_w", pa.int32()), ("bucket_h", pa.int32()),
              ("original_w", pa.int32()), ("original_h", pa.int32()), ("group", pa.string()), ("controls", pa.string()),
              ("tensors", pa.string()), ("provenance", pa.string()), ("latent", pa.large_binary()), ("text", pa.large_binary())]
    meta = {"flowtuner.format": FORMAT, "flowtuner.architecture": arch, "flowtuner.datasets": str(datasets)}
    return pa.schema(fields, metadata=meta)


def _row(item) -> dict:
    from flowtuner.data.loader import LATENT_NAME

    m = LATENT_NAME.match(item.latent.name)
    latent, text = item.latent.read_bytes(), item.text.read_bytes()
    lat_ckpt, txt_ckpt = open_checkpoint(item.latent), open_checkpoint(item.text)
    tensors = {f"{kind}/{k}": [str(c.dtype(k)).removeprefix("torch."), list(c.shape(k))]
               for kind, c in (("latent", lat_ckpt), ("text", txt_ckpt)) for k in c.keys()}
    provenance = {"latent": read_provenance(lat_ckpt.metadata), "text": read_provenance(txt_ckpt.metadata)}
    return {"key": item.key, "dataset": item.dataset, "bucket_w": item.bucket[0], "bucket_h": item.bucket[1],
            "original_w": int(m["w"]), "original_h": int(m["h"]), "group": json.dumps([list(s) for s in item.group]),
            "controls": json.dumps(list(item.controls)), "tensors": json.dumps(tensors, sort_keys=True),
            "provenance": json.dumps(provenance, sort_keys=True), "latent": latent, "text": text}


def _batches(items, schema):
    import pyarrow as pa

    for start in range(0, len(items), ROWS_PER_WRITE):
        rows = [_row(it) for it in items[start : start + ROWS_PER_WRITE]]
        yield pa.RecordBatch.from_pylist(rows, schema=schema)


def write_shards(datasets, family, url: str, file_bytes: int = FILE_BYTES) -> int:
    """Write every complete (latent + text) cache item of the datasets to the Lance dataset at `url`, replacing
    what was there as one new version (readers of the old version are not disturbed); returns the row count."""
    import pyarrow as pa

    from flowtuner.data.loader import scan_caches

    lance = _lance()
    items = sorted(scan_caches(datasets, family), key=lambda it: (it.dataset, it.bucket, it.group, it.controls, it.key))
    schema = _schema(family.cache_arch, len(datasets))
    reader = pa.RecordBatchReader.from_batches(schema, _batches(items, schema))
    target = url if is_remote(url) else str(Path(url).expanduser().absolute())
    row_bytes = max(1, (items[0].latent.stat().st_size + items[0].text.stat().st_size) if items else 1)
    try:
        lance.write_dataset(reader, target, schema=schema, mode="overwrite", storage_options=storage_options(url) or None,
                            max_rows_per_file=max(1, file_bytes // row_bytes), data_storage_version=FILE_VERSION)
    except (OSError, ValueError, RuntimeError) as exc:
        raise _unreachable(url, exc) from None
    return len(items)


# --- reading -------------------------------------------------------------------------------------------------

_OPEN: dict[tuple, object] = {}
_LOCK = threading.Lock()


def open_shards(url: str):
    """The Lance dataset at `url`, opened once per process (the handle is shared by the reader threads)."""
    opts = storage_options(url)
    handle = (url, tuple(sorted(opts.items())))  # another endpoint or key is another store
    with _LOCK:
        if handle not in _OPEN:
            lance = _lance()
            target = url if is_remote(url) else str(Path(url).expanduser().absolute())
            if not is_remote(url) and not Path(target).exists():
                raise ConfigError(f"shards {url}: no such folder; write it with cache-latents/cache-text --to_shards.")
            try:
                ds = lance.dataset(target, storage_options=opts or None)
                meta = {k.decode(): v.decode() for k, v in (ds.schema.metadata or {}).items()}
            except (OSError, ValueError, RuntimeError) as exc:
                raise _unreachable(url, exc) from None
            if meta.get("flowtuner.format") != FORMAT:
                raise ConfigError(f"shards {url}: not flowtuner cache shards ({FORMAT}); write them with --to_shards.")
            _OPEN[handle] = ds
        return _OPEN[handle]


def scan_shards(ds, family) -> list:
    """The CachedItems of dataset `ds` in its shards (the index columns only: no tensor is read), checked
    against the dataset config's buckets as local caches are."""
    from flowtuner.data.buckets import bucket_selector
    from flowtuner.data.loader import CachedItem, CacheError

    store = open_shards(ds.shards)
    meta = {k.decode(): v.decode() for k, v in (store.schema.metadata or {}).items()}
    if meta.get("flowtuner.architecture") != family.cache_arch:
        raise CacheError(f"shards {ds.shards}: cached for '{meta.get('flowtuner.architecture')}', not {family.cache_arch}; "
                         "write shards from this model's caches.")
    columns = ["key", "dataset", "bucket_w", "bucket_h", "original_w", "original_h", "group", "controls"]
    try:
        table = store.to_table(columns=columns, with_row_id=False).to_pydict()
    except (OSError, ValueError, RuntimeError) as exc:
        raise _unreachable(ds.shards, exc) from None
    selector, items = bucket_selector(ds, family.size_step), []
    for row, key in enumerate(table["key"]):
        if table["dataset"][row] != ds.index:
            continue
        bucket = (table["bucket_w"][row], table["bucket_h"][row])
        if selector.select(table["original_w"][row], table["original_h"][row]) != bucket:
            raise CacheError(f"shards {ds.shards}: item '{key}' was cached in bucket {bucket[0]}x{bucket[1]}, but the dataset "
                             "config now buckets it otherwise; re-cache and write the shards again.")
        group = tuple(tuple(s) for s in json.loads(table["group"][row]))
        where = Path(f"{ds.shards}#{key}")
        items.append(CachedItem(key, where, where, bucket, ds.index, tuple(json.loads(table["controls"][row])), group,
                                stream=ds.shards, row=row))
    if not items:
        raise CacheError(f"shards {ds.shards}: no rows of [[datasets]] #{ds.index + 1} (the shards hold {meta.get('flowtuner.datasets')} "
                         "datasets; list them in the order they were cached).")
    return items


def fetch(url: str, rows: list[int]) -> list[tuple["BytesCheckpoint", "BytesCheckpoint"]]:
    """(latent, text) caches of the rows, in order, with one read of the store."""
    store, unique = open_shards(url), sorted(set(rows))  # an item repeated in a batch (num_repeats) is read once
    try:
        table = store.take(unique, columns=["key", "latent", "text"]).to_pydict()
    except (OSError, ValueError, RuntimeError) as exc:
        raise _unreachable(url, exc) from None
    got = {r: (BytesCheckpoint(f"{url}#{k} (latent)", lat), BytesCheckpoint(f"{url}#{k} (text)", txt))
           for r, k, lat, txt in zip(unique, table["key"], table["latent"], table["text"])}
    return [got[r] for r in rows]


class BytesCheckpoint:
    """A cache file held in memory (the safetensors bytes of a shard row), read as weights.reader.Checkpoint is."""

    def __init__(self, path: str, data: bytes):
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        self.path, self.data, self.base = path, data, 8 + n
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries = {k: (DTYPES[v["dtype"]], tuple(v["shape"]), *v["data_offsets"]) for k, v in header.items()}

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][1]

    def dtype(self, key: str) -> torch.dtype:
        return self.entries[key][0]

    def read(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        dtype, shape, begin, end = self.entries[key]
        raw = bytearray(self.data[self.base + begin : self.base + end])
        tensor = torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape) if raw else torch.empty(shape, dtype=dtype)
        if out is None:
            return tensor
        return out.copy_(tensor)
