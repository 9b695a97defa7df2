"""Sharded preprocessed-image cache: write it once, read it from every training task without
holding the whole dataset in memory.

Owns the cache's objects under a caller's `prefix` (the key layout above the prefix is not ours):

    <prefix>/shard-00000.npy ...  uint8 (rows, size, size, 3) NHWC, `rows_per_shard` rows each (the last fewer)
    <prefix>/index.json           format, decode (images.DECODE_VERSION), size, rows, rows_per_shard,
                                  shard_count, the images' sha256 in row order and each shard file's
                                  sha256; written LAST: the commit marker

A cache without its index is a write that stopped partway: readers refuse it and writers redo it.
Readers fetch each shard once per machine into a local folder (GENDER_CACHE_DIR) and memory-map
it, so rows are gathered across shards without loading whole shards. Training (training.batches)
takes its batches either from one in-memory array (the split fits the memory budget) or streamed
from the shards through ShardBatches (it does not); both give the same images in the same order.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from ..environment import get_number, get_path, variable
from ..errors import PermanentError
from ..integrity import sha256_file
from ..storage import Storage, get_recorded, put_recorded, read_verified
from .images import DECODE_VERSION
from .manifest import read_image
from .parallel import cpu_pool

log = logging.getLogger(__name__)

SHARD_ROWS = 2048
INDEX_NAME = "index.json"
# An index of another format, or whose shards another images.DECODE_VERSION decoded, is stale: writers
# rebuild it, readers refuse it (format 2 added `decode`; format 1 caches hold 16-bit images clipped white).
INDEX_FORMAT = 2
CACHE_DIR_ENV = "GENDER_CACHE_DIR"
MEMORY_BUDGET_ENV = "GENDER_MEMORY_BUDGET_MB"
# Images per decode job sent to a worker process: large enough that pickling is a small cost.
DECODE_CHUNK = 256
# Below this many images, worker processes cost more to start than they save.
MIN_IMAGES_FOR_PROCESSES = 1024
FETCH_THREADS = 16
DEFAULT_MEMORY_BUDGET = int(variable(MEMORY_BUDGET_ENV).default * 1024**2)  # 2 GiB


class CacheIncomplete(FileNotFoundError):
    """The cache's index is missing: it was never written, or its writing stopped partway."""


class CacheOutdated(PermanentError):
    """The cache was written in another index format or by another decode: preprocess must rebuild it."""


def _is_current(index: dict) -> bool:
    return index.get("format") == INDEX_FORMAT and index.get("decode") == DECODE_VERSION


def shard_key(prefix: str, number: int) -> str:
    return f"{prefix}/shard-{number:05d}.npy"


def index_key(prefix: str) -> str:
    return f"{prefix}/{INDEX_NAME}"


# --- writing -------------------------------------------------------------------------------------


def _decode_chunk(blobs: list[bytes], size: int) -> np.ndarray:
    """Runs in a worker process: decode and resize a chunk of encoded images."""
    from .images import decode_resize

    return np.stack([decode_resize(blob, size) for blob in blobs])


def _npy_bytes(images: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, images, allow_pickle=False)
    return buf.getvalue()


def _existing_index(storage: Storage, prefix: str, shas: Sequence[str], size: int) -> dict | None:
    """The committed index if the cache is already written for exactly these images at this size, by
    this decode. A stale index (another format or decode) is deleted first: while the cache is
    rebuilt, readers find it incomplete rather than shards that do not match their index."""
    if not storage.exists(index_key(prefix)):
        return None
    index = json.loads(get_recorded(storage, index_key(prefix)))
    if not _is_current(index):
        log.info("shards: %s was written by an older version (format %s, decode %s): rebuilding it", prefix,
                 index.get("format"), index.get("decode"))  # fmt: skip
        storage.delete(index_key(prefix))
        return None
    if index["size"] != size or index["sha256"] != list(shas):
        raise PermanentError(
            f"the shard cache {index_key(prefix)} holds other images ({index['rows']} at {index['size']} px) than "
            f"asked ({len(shas)} at {size} px); use a prefix that names the dataset and size, or delete the old cache"
        )
    # Committed, but shards may have gone since (removed by hand or by a lifecycle rule, a `verify --repair`
    # stopped before the index, a FIFO in a shard's place: size 0): then every training would fail on the
    # missing shard, retry after retry. One listing says it; the cache is rebuilt from the stored images.
    stored = {o.key: o.size for o in storage.list_info(f"{prefix}/")}
    missing = [key for key in (shard_key(prefix, n) for n in range(index["shard_count"])) if not stored.get(key)]
    if missing:
        log.warning("shards: %s lacks %d of its %d shards (removed or emptied since it was written, e.g. %s): "
                    "rebuilding it", prefix, len(missing), index["shard_count"], storage.url(missing[0]))  # fmt: skip
        storage.delete(index_key(prefix))
        return None
    return index


def _check_unique(shas: Sequence[str]) -> None:
    duplicated = pd.Index(shas).duplicated()
    if duplicated.any():
        raise PermanentError(
            f"sha256 {shas[int(np.argmax(duplicated))]} is given twice; pass each image once "
            "(manifest.drop_duplicates('sha256'))"
        )


def _decoder(n_images: int, workers: int | None) -> Executor:
    """Worker processes where decoding is worth spreading (PIL holds the GIL for part of a decode)."""
    return cpu_pool(n_images, workers, MIN_IMAGES_FOR_PROCESSES)


def _submit_shard(storage, keys, size, fetch_pool, decode_pool):
    """Fetch a shard's images (threads: network-bound), each checked against the sha256 its key names,
    and queue their decoding (processes)."""
    blobs = list(fetch_pool.map(functools.partial(read_image, storage), keys))
    chunks = [blobs[i : i + DECODE_CHUNK] for i in range(0, len(blobs), DECODE_CHUNK)]
    return [decode_pool.submit(_decode_chunk, chunk, size) for chunk in chunks]


def write_shards(storage: Storage, prefix: str, shas: Sequence[str], image_keys: Sequence[str], size: int, *,
                 rows_per_shard: int = SHARD_ROWS, workers: int | None = None) -> dict:  # fmt: skip
    """Decode `image_keys` (stored images, their content's `shas`, in row order) at `size` px into
    shards under `prefix`, index last; returns the index. A complete cache for the same images is
    reused; a partial one (no index) is overwritten."""
    shas, image_keys = list(shas), list(image_keys)
    _check_unique(shas)
    if (index := _existing_index(storage, prefix, shas, size)) is not None:
        log.info("shards: %s already cached (%d images)", prefix, index["rows"])
        return index
    starts = list(range(0, len(shas), rows_per_shard))
    shard_sums: list[str] = []
    started = time.monotonic()
    with ThreadPoolExecutor(FETCH_THREADS) as fetch_pool, ThreadPoolExecutor(1) as upload_pool, \
            _decoder(len(shas), workers) as decode_pool:  # fmt: skip
        pending = _submit_shard(storage, image_keys[:rows_per_shard], size, fetch_pool, decode_pool) if starts else []
        upload = None
        for number, start in enumerate(starts):
            decoding, pending = pending, []
            if number + 1 < len(starts):  # the next shard decodes while this one is stored
                nxt = image_keys[starts[number + 1] : starts[number + 1] + rows_per_shard]
                pending = _submit_shard(storage, nxt, size, fetch_pool, decode_pool)
            data = _npy_bytes(np.concatenate([f.result() for f in decoding]))
            shard_sums.append(hashlib.sha256(data).hexdigest())
            if upload is not None:
                upload.result()  # at most one shard in flight: memory stays bounded
            upload = upload_pool.submit(storage.put_bytes, shard_key(prefix, number), data)
            done = min(start + rows_per_shard, len(shas))
            log.info("shards %s: %d/%d written, %d images, %.0f images/s", prefix, number + 1, len(starts), done,
                     done / max(time.monotonic() - started, 1e-9))  # fmt: skip
        if upload is not None:
            upload.result()
    index = {"format": INDEX_FORMAT, "decode": DECODE_VERSION, "size": size, "rows": len(shas),
             "rows_per_shard": rows_per_shard, "shard_count": len(starts), "dtype": "uint8",
             "shape": [size, size, 3], "sha256": shas, "shard_sha256": shard_sums}  # fmt: skip
    put_recorded(storage, index_key(prefix), json.dumps(index).encode())  # the commit marker, last
    return index


# --- reading -------------------------------------------------------------------------------------


def read_index(storage: Storage, prefix: str) -> dict:
    key = index_key(prefix)
    if not storage.exists(key):
        raise CacheIncomplete(
            f"no shard cache index at {key}: the cache under {prefix} was never completed (its writing stopped "
            "partway, or preprocessing has not run); run the preprocess step to (re)build it"
        )
    index = json.loads(get_recorded(storage, key))
    if not _is_current(index):
        raise CacheOutdated(
            f"the shard cache {key} was written by an older version of the pipeline (index format "
            f"{index.get('format')}, decode {index.get('decode')}; this version reads format {INDEX_FORMAT}, decode "
            f"{DECODE_VERSION}): its images were decoded differently; run the preprocess step to rebuild it"
        )
    return index


def memory_budget() -> int:
    """Bytes of decoded images one task may hold in memory (GENDER_MEMORY_BUDGET_MB); past it, it streams."""
    megabytes = get_number(MEMORY_BUDGET_ENV, error=PermanentError)
    return int(megabytes * 1024**2)


def local_cache_root() -> Path:
    """Where shards are kept on this machine: GENDER_CACHE_DIR, or a folder of this user's own in the temp
    dir (made 0700: another user of the machine can neither read the faces nor plant pixels)."""
    configured = get_path(CACHE_DIR_ENV)
    if configured is not None:
        return configured
    return Path(tempfile.gettempdir()) / f"gender-shard-cache-{os.getuid()}"


def private_folder(root: Path) -> Path:
    """`root`, created 0700 if missing, refused if another user owns it or others may write in it."""
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = root.stat()
    except OSError as exc:
        raise PermanentError(f"the local shard cache {root} cannot be created ({exc.strerror or exc}); set "
                             f"{CACHE_DIR_ENV} to a folder of your own") from None  # fmt: skip
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        owner = (
            "another user owns it"
            if st.st_uid != os.getuid()
            else f"others may write in it (mode {st.st_mode & 0o777:o})"
        )
        raise PermanentError(
            f"the local shard cache {root} is not private: {owner}, so its files could be replaced under this "
            f"run. Set {CACHE_DIR_ENV} to a folder of your own, or `chmod 700 {root}`"
        )
    return root


def _fetch_shard(storage: Storage, key: str, checksum: str, path: Path) -> Path:
    """The local copy of a shard, checked against the index's sha256 every time a reader opens it.

    A copy that does not match (damaged or changed on this machine) is replaced by a fresh download;
    a download that does not match is an IntegrityError naming the stored shard. Downloads go to a
    temp file beside `path`, checked, then renamed into place: two processes fetching at once both
    write whole files and the rename is atomic.
    """
    if path.exists():
        if sha256_file(path) == checksum:
            return path
        log.warning("the local copy %s of %s does not match its checksum in the cache index (changed on this "
                    "machine): replacing it with a fresh download", path, storage.url(key))  # fmt: skip
    data = read_verified(storage, key, checksum, what=f"the shard {storage.url(key)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class ShardReader:
    """The cache's rows, memory-mapped from local copies of the shards: `len`, `index_of`, `take`."""

    def __init__(self, storage: Storage, prefix: str, *, cache_dir: Path | None = None):
        self.index = read_index(storage, prefix)
        self.rows_per_shard = int(self.index["rows_per_shard"])
        folder = private_folder(Path(cache_dir or local_cache_root())) / prefix
        # The shard's checksum in the file name: a rebuilt cache never reuses stale local files.
        paths = [folder / f"shard-{n:05d}-{s[:16]}.npy" for n, s in enumerate(self.index["shard_sha256"])]
        with ThreadPoolExecutor(FETCH_THREADS) as pool:
            jobs = zip(range(len(paths)), self.index["shard_sha256"], paths, strict=True)
            self.paths = list(pool.map(lambda j: _fetch_shard(storage, shard_key(prefix, j[0]), j[1], j[2]), jobs))
        self._row_of = pd.Index(self.index["sha256"])
        self._maps: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.index["rows"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.index["shape"])

    def __getstate__(self) -> dict:  # DataLoader workers re-map the files themselves
        return {**self.__dict__, "_maps": {}}

    def index_of(self, sha256: str) -> int:
        return int(self.indices_of([sha256])[0])

    def indices_of(self, shas: Sequence[str]) -> np.ndarray:
        rows = self._row_of.get_indexer(list(shas))
        if (rows < 0).any():
            missing = list(shas)[int(np.argmax(rows < 0))]
            raise KeyError(f"image {missing} is not in the shard cache; rebuild the cache for this manifest")
        return rows.astype(np.int64)

    def _shard(self, number: int, keep_mapped: bool) -> np.ndarray:
        if number in self._maps:
            return self._maps[number]
        array = np.load(self.paths[number], mmap_mode="r")
        if keep_mapped:
            self._maps[number] = array
        return array

    def take(self, indices: Sequence[int] | np.ndarray, *, keep_mapped: bool = True) -> np.ndarray:
        """The rows at `indices`, in that order, as one array: only those rows are read. With
        `keep_mapped` false the shards are unmapped afterwards, so that their pages leave this
        process's resident memory (streaming a dataset larger than memory)."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"row indices must be 0-{len(self) - 1}, got {indices.min()}..{indices.max()}")
        out = np.empty((len(indices), *self.image_shape), dtype=np.uint8)
        shard, offset = np.divmod(indices, self.rows_per_shard)
        for number in np.unique(shard):
            where = np.flatnonzero(shard == number)
            out[where] = self._shard(int(number), keep_mapped)[offset[where]]
        return out

    def nbytes(self, rows: int) -> int:
        return rows * int(np.prod(self.image_shape))


# --- batches -------------------------------------------------------------------------------------


class ShardBatches:
    """Map-style dataset whose item b is batch b (uint8 NHWC images, labels) of a split's `rows`,
    read from the shards. For torch's DataLoader with batch_size=None, workers and pinned memory
    (a plain class, not torch's Dataset subclass, so decode workers need not import torch)."""

    def __init__(self, reader: ShardReader, rows: np.ndarray, labels: np.ndarray, batches: Sequence[np.ndarray]):
        """Batch b holds the positions `batches[b]` into `rows` (the caller's order, cut into batches)."""
        self.reader, self.rows, self.labels = reader, np.asarray(rows), np.asarray(labels)
        self.batches = list(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        positions = self.batches[b]
        return self.reader.take(self.rows[positions], keep_mapped=False), self.labels[positions]
