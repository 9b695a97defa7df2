"""Worker pools for CPU-bound steps: processes where the GIL binds (decoding, hashing), one thread
where a set is too small to repay starting processes."""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.process
import os
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor

log = logging.getLogger(__name__)


class _TaskMainProcess(multiprocessing.process.BaseProcess):
    """multiprocessing's own main-process object (the standard library's `_MainProcess`, which it
    deletes once made): no parent, not a daemon, a fresh authentication key."""

    def __init__(self):
        self._identity = ()
        self._name = "MainProcess"
        self._parent_pid = None
        self._popen = None
        self._closed = False
        self._config = {"authkey": multiprocessing.process.AuthenticationString(os.urandom(32)), "semprefix": "/mp"}

    def close(self) -> None:
        pass


def allow_worker_processes() -> None:
    """Let this process start worker processes (decode pools, DataLoader workers) under Celery.

    Airflow's CeleryExecutor runs a task in a process forked from one of Celery's prefork pool
    workers (billiard). That leaves billiard's process object as multiprocessing's current process:
    a daemon, with an authentication key the standard library refuses to pickle, so multiprocessing
    refuses to start any child ("daemonic processes are not allowed to have children"). The task
    process is the root of its own work (Airflow's supervisor watches it, and every pool of ours ends
    with its step), so it takes a fresh main-process identity, as a process started from a shell has.
    A no-op anywhere else.
    """
    current = multiprocessing.current_process()
    if type(current).__module__.startswith(("multiprocessing.", __name__)) and not current.daemon:
        return  # the standard library's own process object (or ours), not a daemon: children are allowed
    log.info("this task runs in a process forked from %s (%s, a Celery pool worker?): taking a main-process "
             "identity so that it can start worker processes", current.name, type(current).__name__)  # fmt: skip
    multiprocessing.process._current_process = _TaskMainProcess()


def cpu_pool(n_items: int, workers: int | None, min_items: int, *, threads: int = 1) -> Executor:
    """`workers` processes (default: one per core) for `n_items` jobs' worth of decoding, or `threads`
    threads below `min_items` (or with one worker). Spawned, not forked: the caller may hold threads
    (boto3, Airflow's supervisor), and a forked copy of a held lock never unlocks."""
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers <= 1 or n_items < min_items:
        return ThreadPoolExecutor(max_workers=threads)
    allow_worker_processes()
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
