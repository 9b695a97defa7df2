"""Preprocess once: decode and resize every image a single time per input size, cache as uint8 shards.

    datasets/<dataset_id>/cache/<size>px/shard-00000.npy ... index.json   (see data.shards)

The cache holds every distinct image of the dataset in sha256 order, so every split, seed and
model of that size, and every later run over the same dataset, reuse it. Training reads it through
`shards.ShardReader` (memory-mapped local copies), never the JPEGs.
"""

from __future__ import annotations

import logging

import pandas as pd

from ..layout import cache_prefix
from ..storage import Storage
from .shards import write_shards

log = logging.getLogger(__name__)


def build_cache(storage: Storage, manifest: pd.DataFrame, dataset_id: str, size: int, *,
                workers: int | None = None) -> str:  # fmt: skip
    """Create the sharded cache for `size` unless it is complete already; returns its prefix.

    Decoding runs in one process per core (`workers`, default all), fetching on threads.
    """
    prefix = cache_prefix(dataset_id, size)
    # sha256 order, not the manifest's: any split of the dataset names the same cache.
    rows = manifest.drop_duplicates("sha256").sort_values("sha256")
    index = write_shards(storage, prefix, rows["sha256"].tolist(), rows["key"].tolist(), size, workers=workers)
    log.info("preprocess: %s holds %d images at %dpx in %d shards", prefix, index["rows"], size, index["shard_count"])
    return prefix
