"""Worker pools for CPU-bound steps: processes where the GIL binds (decoding, hashing), one thread
where a set is too small to repay starting processes."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor


def cpu_pool(n_items: int, workers: int | None, min_items: int) -> Executor:
    """`workers` processes (default: one per core) for `n_items` jobs' worth of decoding, or a single
    thread below `min_items` (or one worker). Spawned, not forked: the caller may hold threads
    (boto3, Airflow's supervisor), and a forked copy of a held lock never unlocks."""
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers <= 1 or n_items < min_items:
        return ThreadPoolExecutor(max_workers=1)
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
