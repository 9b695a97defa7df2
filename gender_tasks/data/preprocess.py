"""Preprocess once: decode and resize every image a single time per input size, cache as uint8.

    datasets/<dataset_id>/cache/<size>px.npz   arrays: sha256 (N,), images (N, size, size, 3) uint8

Keyed by content, so every model of that size and every later run over the same dataset reuse it.
Training reads this cache, never the JPEGs.
"""

from __future__ import annotations

import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from ..layout import cache_key
from ..storage import Storage
from .images import decode_resize

log = logging.getLogger(__name__)


def build_cache(storage: Storage, manifest: pd.DataFrame, dataset_id: str, size: int, *, workers: int = 8) -> str:
    """Create the cache for `size` unless it exists; returns its key."""
    key = cache_key(dataset_id, size)
    if storage.exists(key):
        log.info("preprocess: %s already cached", key)
        return key
    rows = manifest.drop_duplicates("sha256")
    started = time.monotonic()

    def load(k: str) -> np.ndarray:
        return decode_resize(storage.get_bytes(k), size)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        images = np.stack(list(pool.map(load, rows["key"])))
    buf = io.BytesIO()
    np.savez(buf, sha256=rows["sha256"].to_numpy(dtype=str), images=images)
    storage.put_bytes(key, buf.getvalue())
    elapsed = time.monotonic() - started
    log.info("preprocess: %d images at %dpx in %.1fs (%.0f images/s)", len(rows), size, elapsed, len(rows) / elapsed)
    return key


def load_cache(storage: Storage, dataset_id: str, size: int) -> tuple[np.ndarray, dict[str, int]]:
    """The cached images and a sha256 -> row index map."""
    with np.load(io.BytesIO(storage.get_bytes(cache_key(dataset_id, size)))) as npz:
        shas, images = npz["sha256"], npz["images"]
    return images, {s: i for i, s in enumerate(shas)}
