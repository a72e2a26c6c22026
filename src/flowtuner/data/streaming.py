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

Reading s3:// shards goes through a bounded local cache of whole data files (what mosaicml-streaming does
with its shards): a data file is fetched with one GET on first use, unpacked once into its rows' bytes
(RowsFile) under `shards_cache`, and read from there as local cache files are read; a thread fetches the files
of the next PREFETCH_BATCHES batches of the plan ahead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
import threading
from pathlib import Path

import numpy as np
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


# --- the local cache of remote data files ----------------------------------------------------------------------

PREFETCH_BATCHES = 8  # batches of the plan whose data files a thread fetches ahead of the readers
_STORES: dict[str, "ShardStore"] = {}
_PINNED: dict[Path, int] = {}  # local data files being read by this process: never evicted
_FILE_LOCKS: dict[Path, threading.Lock] = {}
_EVICT_LOCK = threading.Lock()
_OVER = False  # the last eviction left the cache above its limit (files in use were spared)


def default_cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flowtuner" / "shards"


def _s3_filesystem(url: str):
    """A pyarrow S3 filesystem with the same endpoint, credentials and bounded retries as Lance's client."""
    from pyarrow import fs

    opts = storage_options(url)
    endpoint = opts.get("endpoint")
    scheme = "https"
    if endpoint:
        scheme, _, endpoint = endpoint.rpartition("://") if "://" in endpoint else ("https", "", endpoint)
    return fs.S3FileSystem(access_key=opts.get("aws_access_key_id"), secret_key=opts.get("aws_secret_access_key"),
                           session_token=opts.get("aws_session_token"), region=opts["region"], scheme=scheme,
                           endpoint_override=endpoint, connect_timeout=CONNECT_TIMEOUT_S, request_timeout=REQUEST_TIMEOUT_S,
                           retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=MAX_RETRIES + 1))


class ShardStore:
    """Rows of one shards URL: read from the store directly (a local folder, or `shards_cache = "none"`), or
    from the local cache under `root`/<hash of URL and endpoint>/: `data/<data file>.rows`, each fetched data file
    unpacked once into its rows' bytes (RowsFile), so that a warm read is a plain read of the row's bytes, as
    from local cache files, and not a decode of Lance pages (measured 2x slower; docs/scale.md)."""

    def __init__(self, url: str, root: Path | None, limit: int):
        self.url, self.remote, self.root, self.limit = url, open_shards(url), root, limit
        self._fragments: list | None = None  # the store's fragments, in `starts`' order (listed on first take)
        starts, self.files = [], []
        for frag in self.remote.get_fragments():
            meta = frag.metadata
            if meta.deletion_file is not None:
                raise StreamError(f"shards {url}: fragment {frag.fragment_id} has deleted rows, which --to_shards never writes; "
                                  "write the shards again with --to_shards.")
            starts.append(meta.physical_rows)
            self.files.append([(d.path, d.file_size_bytes) for d in meta.data_files()])
        self.starts = np.concatenate([[0], np.cumsum(starts)]).astype(np.int64)
        if root is not None:
            if any(len(files) != 1 for files in self.files):  # --to_shards writes every column of a row to one file
                raise StreamError(f"shards {url}: a fragment spans several data files, which --to_shards never writes; "
                                  "write the shards again with --to_shards.")
            endpoint = storage_options(url).get("endpoint", "")
            self.dir = root / hashlib.sha256(f"{endpoint}|{url}".encode()).hexdigest()[:16]
            self.fs, self.prefix = _s3_filesystem(url), url.removeprefix("s3://").rstrip("/")
            (self.dir / "data").mkdir(parents=True, exist_ok=True)

    @property
    def cached(self) -> bool:
        return self.root is not None

    def _download(self, key: str, dest: Path, size: int | None) -> None:
        """One GET of the whole object into `dest` (a temp name: the caller renames what it makes of it)."""
        try:
            with self.fs.open_input_file(f"{self.prefix}/{key}") as f:  # a HEAD, then one GET of it all
                data = f.read()
        except OSError as exc:
            raise _unreachable(self.url, exc) from None
        if size and len(data) != size:
            raise StreamError(f"shards {self.url}: {key} is {len(data)} bytes in the store, the manifest says {size}; "
                              "the shards changed while reading: start again.")
        dest.write_bytes(data)

    def fragments_of(self, rows) -> set[int]:
        return set((np.searchsorted(self.starts, np.asarray(rows, dtype=np.int64), side="right") - 1).tolist())

    def ensure(self, fragment: int, pinned: list[Path] | None = None) -> Path:
        """The local rows file of a fragment, fetched and unpacked now if absent or not whole (an interrupted or
        truncated write). With `pinned`, it is pinned (appended there) before it is looked at, so no thread of
        this process evicts it between this check and the read."""
        [(name, size)] = self.files[fragment]
        path = self.dir / "data" / f"{name}.rows"
        with _LOCK:
            lock = _FILE_LOCKS.setdefault(path, threading.Lock())
        if pinned is not None:
            _pin([path], 1)
            pinned.append(path)
        with lock:
            state = RowsFile.check(path, int(self.starts[fragment + 1] - self.starts[fragment]))
            if state == "bad":
                log.warning("shards cache: %s is not whole; fetching it again", path)
            if state != "ok":
                self._fetch_rows(name, size, path)
                _evict(self.root, self.limit)
            else:
                os.utime(path)  # least recently used first out: the mtime is the last use
        return path

    def _fetch_rows(self, name: str, size: int, dest: Path) -> None:
        """Download the data file, unpack its rows into `dest` (a temp file renamed over it: readers and other ranks
        of this node see the whole file or none; the last rename wins, the files are equal), drop the download."""
        from lance.file import LanceFileReader

        tag = f"{os.getpid()}.{threading.get_ident()}"
        lance_tmp, rows_tmp = dest.with_name(f".{name}.{tag}.tmp"), dest.with_name(f".{dest.name}.{tag}.tmp")
        try:
            self._download(f"data/{name}", lance_tmp, size)
            try:
                table = LanceFileReader(str(lance_tmp), columns=list(RowsFile.COLUMNS)).read_all().to_table()
            except (OSError, ValueError, RuntimeError) as exc:
                raise StreamError(f"shards {self.url}: data file {name} cannot be read ({' '.join(str(exc).split())[:200]}); "
                                  "write the shards again with --to_shards.") from None
            RowsFile.write(rows_tmp, [_binary_views(table.column(c)) for c in RowsFile.COLUMNS])
            os.replace(rows_tmp, dest)
        except OSError as exc:  # the network's errors are StreamErrors by now: this is the local disk
            raise StreamError(f"shards cache {self.dir}: {exc.strerror or exc}; free space there, or set shards_cache / "
                              "shards_cache_limit in the dataset config.") from None
        finally:
            lance_tmp.unlink(missing_ok=True)
            rows_tmp.unlink(missing_ok=True)

    def read(self, rows: list[int]) -> list[tuple[str, bytearray, bytearray]]:
        """(key, latent bytes, text bytes) of the rows (ascending), from the local rows files."""
        out = []
        for attempt in (0, 1):
            paths: list[Path] = []
            try:
                where = np.searchsorted(self.starts, np.asarray(rows, dtype=np.int64), side="right") - 1
                for f in np.unique(where).tolist():
                    path = self.ensure(f, paths)
                    local = [r - int(self.starts[f]) for r, w in zip(rows, where.tolist()) if w == f]
                    out += RowsFile.read(path, local)
                return out
            except FileNotFoundError:
                if attempt:
                    raise
                out = []
                log.info("shards cache: a data file was evicted by another process while reading; fetching it again")
            finally:
                _pin(paths, -1)
                if _OVER:  # an eviction had to spare files pinned then: retry now that these are free
                    _evict(self.root, self.limit)

    def take(self, rows: list[int], columns: list[str]):
        """The rows (ascending) from the store. Each fragment's rows from the fragment (`LanceFragment.take` with
        offsets in it), concatenated: the dataset-level `take`, which maps every row to its fragment again,
        measured 2x slower for these large rows (docs/scale.md)."""
        import pyarrow as pa

        if self._fragments is None:
            self._fragments = self.remote.get_fragments()
        rows = np.asarray(rows, dtype=np.int64)
        assert rows.size < 2 or (np.diff(rows) > 0).all(), "ascending distinct rows: the result keeps their order"
        where = np.searchsorted(self.starts, rows, side="right") - 1
        tables = [self._fragments[f].take((rows[where == f] - self.starts[f]).tolist(), columns=columns)
                  for f in np.unique(where).tolist()]
        return pa.concat_tables(tables) if len(tables) != 1 else tables[0]

    def index(self, columns: list[str]):
        """The index columns of every row. With a cache they are kept there per version (a small Arrow file beside
        the data files, never evicted), so a warm start reads nothing from the store; the first start reads them
        from the store (ranged reads of those columns only, so a cold start does not download the dataset)."""
        from pyarrow import feather

        if not self.cached:
            return self.remote.to_table(columns=columns, with_row_id=False)
        kept = self.dir / f"index-v{self.remote.version}.arrow"
        if kept.is_file():
            table = feather.read_table(str(kept))
            if table.column_names == columns and table.num_rows == int(self.starts[-1]):
                return table
        table = self.remote.to_table(columns=columns, with_row_id=False)
        tmp = kept.with_name(f".{kept.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        feather.write_feather(table, str(tmp), compression="uncompressed")
        os.replace(tmp, kept)
        return table


class RowsFile:
    """A data file's rows unpacked: MAGIC, the row count n (u64), 3n+1 offsets (i64: key, latent and text of each
    row, in order, then the end), then those bytes. Whole when its size is the last offset and n is the count
    the version's manifest gives the fragment."""

    MAGIC = b"FTROWS01"
    COLUMNS = ("key", "latent", "text")

    @staticmethod
    def write(path: Path, columns: list[list[memoryview]]) -> None:
        values = [v for row in zip(*columns) for v in row]
        n = len(values) // len(RowsFile.COLUMNS)
        head = len(RowsFile.MAGIC) + 8 + 8 * (len(values) + 1)
        offsets = np.concatenate([[0], np.cumsum([len(v) for v in values])]).astype(np.int64) + head
        with open(path, "wb") as f:
            f.write(RowsFile.MAGIC + struct.pack("<Q", n) + offsets.tobytes())
            for v in values:
                f.write(v)

    @staticmethod
    def _offsets(f, n: int | None = None) -> np.ndarray | None:
        start = f.read(len(RowsFile.MAGIC) + 8)
        if len(start) != len(RowsFile.MAGIC) + 8 or not start.startswith(RowsFile.MAGIC):
            return None
        (count,) = struct.unpack("<Q", start[len(RowsFile.MAGIC):])
        if n is not None and count != n:
            return None
        raw = f.read(8 * (len(RowsFile.COLUMNS) * count + 1))
        return np.frombuffer(raw, dtype=np.int64) if len(raw) == 8 * (len(RowsFile.COLUMNS) * count + 1) else None

    @staticmethod
    def check(path: Path, n: int) -> str:
        """"missing", "bad" (not whole) or "ok"."""
        try:
            with open(path, "rb") as f:
                offsets = RowsFile._offsets(f, n)
                return "ok" if offsets is not None and os.fstat(f.fileno()).st_size == offsets[-1] else "bad"
        except FileNotFoundError:
            return "missing"

    @staticmethod
    def read(path: Path, rows: list[int]) -> list[tuple[str, bytearray, bytearray]]:
        """(key, latent, text) of the rows (offsets within the file's fragment), each read straight into its buffer."""
        out = []
        with open(path, "rb") as f:
            offsets = RowsFile._offsets(f)
            if offsets is None:
                raise StreamError(f"{path}: not a whole shards cache file; delete it and start again.")
            k = len(RowsFile.COLUMNS)
            for r in rows:
                parts = []
                for c in range(k):
                    begin, end = int(offsets[k * r + c]), int(offsets[k * r + c + 1])
                    buf = bytearray(end - begin)
                    if os.preadv(f.fileno(), [buf], begin) != len(buf):
                        raise StreamError(f"{path}: cut short; delete it and start again.")
                    parts.append(buf)
                out.append((parts[0].decode(), parts[1], parts[2]))
        return out


def _pin(paths: list[Path], delta: int) -> None:
    with _LOCK:
        for p in paths:
            _PINNED[p] = _PINNED.get(p, 0) + delta
            if not _PINNED[p]:
                del _PINNED[p]


def _evict(root: Path, limit: int) -> None:
    """Delete the least recently used data files under `root` (every shards URL cached there) until their total is
    within `limit`; files this process is reading stay (the total may then exceed the limit until they are read)."""
    global _OVER
    with _EVICT_LOCK:
        files = []
        for path in root.glob("*/data/*.rows"):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue  # another rank evicted it
            files.append((st.st_mtime, st.st_size, path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= limit:
                break
            with _LOCK:  # checked and deleted together: a reader pins before it looks (ShardStore.ensure)
                if path in _PINNED:
                    continue
                path.unlink(missing_ok=True)
            total -= size
        _OVER = total > limit


def shard_store(url: str, cache: str | None = None, limit: int = 20 * 10**9) -> ShardStore:
    """The ShardStore of `url`, made once per process (the first dataset naming the URL sets its cache)."""
    with _LOCK:
        store = _STORES.get(url)
    if store is None:
        root = None if not url.startswith("s3://") or cache == "none" else Path(cache) if cache else default_cache_root()
        store = ShardStore(url, root, limit)
        with _LOCK:
            store = _STORES.setdefault(url, store)
    return store


def scan_shards(ds, family) -> list:
    """The CachedItems of dataset `ds` in its shards (the index columns only: no tensor is read), checked
    against the dataset config's buckets as local caches are."""
    from flowtuner.data.buckets import bucket_selector
    from flowtuner.data.loader import CachedItem, CacheError

    store = shard_store(ds.shards, getattr(ds, "shards_cache", None), getattr(ds, "shards_cache_limit", 20 * 10**9))
    meta = {k.decode(): v.decode() for k, v in (store.remote.schema.metadata or {}).items()}
    if meta.get("flowtuner.architecture") != family.cache_arch:
        raise CacheError(f"shards {ds.shards}: cached for '{meta.get('flowtuner.architecture')}', not {family.cache_arch}; "
                         "write shards from this model's caches.")
    columns = ["key", "dataset", "bucket_w", "bucket_h", "original_w", "original_h", "group", "controls"]
    try:
        table = store.index(columns).to_pydict()
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
    """(latent, text) caches of the rows, in order: from the local rows files, or with one read of the store."""
    store, unique = shard_store(url), sorted(set(rows))  # an item repeated in a batch (num_repeats) is read once
    if store.cached:
        found = store.read(unique)
    else:
        try:
            table = store.take(unique, list(RowsFile.COLUMNS))
        except (OSError, ValueError, RuntimeError) as exc:
            raise _unreachable(url, exc) from None
        found = zip(table.column("key").to_pylist(), *(_binary_views(table.column(c)) for c in ("latent", "text")))
    got = {r: (BytesCheckpoint(f"{url}#{k} (latent)", lat), BytesCheckpoint(f"{url}#{k} (text)", txt))
           for r, (k, lat, txt) in zip(unique, found)}
    return [got[r] for r in rows]


def _binary_views(column) -> list[memoryview]:
    """Each value of a binary or string column as a view of Arrow's data buffer, sliced at its offsets: no copy.
    (Iterating the column's scalars and taking `as_buffer()` copied every value: measured 0.5 GB/s, half of a
    warm epoch's time.) The tensors are then copied once, into the batch (BytesCheckpoint.read)."""
    import pyarrow as pa

    width = np.int64 if pa.types.is_large_binary(column.type) or pa.types.is_large_string(column.type) else np.int32
    views = []
    for chunk in column.chunks:
        _, offsets, data = chunk.buffers()
        ends = np.frombuffer(offsets, dtype=width)[chunk.offset : chunk.offset + len(chunk) + 1]
        whole = memoryview(data) if data is not None else memoryview(b"")
        views += [whole[a:b] for a, b in zip(ends[:-1].tolist(), ends[1:].tolist())]
    return views


class Prefetching:
    """The batches of a sampler, while a thread fetches the data files of the next `ahead` batches into the
    shards cache, so a cold epoch overlaps downloads with compute."""

    def __init__(self, sampler, items: list, ahead: int = PREFETCH_BATCHES):
        self.sampler, self.items, self.ahead = sampler, items, ahead

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        batches = list(self.sampler)
        state = {"at": 0, "stop": False}
        wake = threading.Condition()
        thread = threading.Thread(target=self._run, args=(batches, state, wake), daemon=True, name="shards-prefetch")
        thread.start()
        try:
            for i, batch in enumerate(batches):
                with wake:
                    state["at"] = i
                    wake.notify()
                yield batch
        finally:
            with wake:
                state["stop"] = True
                wake.notify()

    def _run(self, batches, state, wake) -> None:
        for i, batch in enumerate(batches):
            with wake:
                wake.wait_for(lambda: state["stop"] or i <= state["at"] + self.ahead)
                if state["stop"]:
                    return
            rows: dict[str, list[int]] = {}
            for j in batch:
                it = self.items[j]
                if it.stream:
                    rows.setdefault(it.stream, []).append(it.row)
            for url, where in rows.items():
                store = shard_store(url)
                if not store.cached:
                    continue
                try:
                    for f in sorted(store.fragments_of(where)):
                        store.ensure(f)
                except Exception as exc:  # noqa: BLE001 - the reader that needs the file fetches it again and reports the error
                    log.debug("shards prefetch: %s", exc)


class BytesCheckpoint:
    """A cache file held in memory (the safetensors bytes of a shard row), read as weights.reader.Checkpoint is."""

    def __init__(self, path: str, data: bytes | memoryview):
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(bytes(data[8 : 8 + n]))
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
        """As Checkpoint.read: the tensor `key`, copied once from the row's bytes into `out` when given; else a view
        of them when they are this row's own buffer (a bytearray read from the shards cache), else a copy."""
        dtype, shape, begin, end = self.entries[key]
        need = math.prod(shape) * dtype.itemsize
        if end - begin != need:
            raise StreamError(f"{self.path}: {key} holds {end - begin} bytes, {dtype} {list(shape)} needs {need}; "
                              "write the shards again with --to_shards.")
        if out is None and isinstance(self.data, bytearray) and need and (self.base + begin) % dtype.itemsize == 0:
            return torch.frombuffer(self.data, dtype=torch.uint8, count=need, offset=self.base + begin).view(dtype).reshape(shape)
        if out is None:
            out = torch.empty(shape, dtype=dtype)
        elif tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous():
            raise StreamError(f"{self.path}: {key} is {dtype} {list(shape)}, expected {out.dtype} {list(out.shape)}.")
        if need:
            np.copyto(out.reshape(-1).view(torch.uint8).numpy(), np.frombuffer(self.data[self.base + begin : self.base + end], dtype=np.uint8))
        return out
