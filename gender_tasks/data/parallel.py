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


def _forked_from_celery_pool_worker(current: multiprocessing.process.BaseProcess) -> bool:
    """Whether multiprocessing's current process is a Celery (billiard) pool worker's, inherited by fork."""
    return type(current).__module__.split(".")[0] == "billiard"


def allow_worker_processes() -> None:
    """Let this process start worker processes (decode pools, DataLoader workers) under Celery.

    Airflow's CeleryExecutor runs a task in a process forked (by Airflow's supervisor) from one of
    Celery's prefork pool workers. billiard, Celery's fork of multiprocessing, makes its worker the
    standard library's current process (billiard.process._set_current_process assigns
    multiprocessing.process._current_process), so the task inherits it: a daemon, whose authentication
    key is billiard's AuthenticationString. multiprocessing then refuses to start any child ("daemonic
    processes are not allowed to have children"), and a spawned one could not be started anyway: spawn
    pickles the current process's key (in the child's preparation data, and in every Process, which
    copies the current process's settings), and billiard's key refuses the standard library's pickler.

    This puts back the standard library's main-process object, as a process started from a shell has,
    by assigning the same private variable billiard assigns. No public interface does it, as checked
    with Python 3.11, billiard 4.3, Celery 5.6 and Airflow 3.3:
    - `multiprocessing.current_process().daemon = False` (a public setter) passes the daemon check, but
      spawning still fails on the key, and the public `authkey` setter of billiard's process object
      wraps the new key in billiard's class again ("Pickling an AuthenticationString object is
      disallowed"); PYTHONOPTIMIZE=1 (drops the check with every assert) leaves the same failure;
    - Airflow's `[celery] pool`: its documented choices besides prefork are `solo` (one task per
      worker process; a GPU worker runs GPUs x GENDER_TASKS_PER_GPU at once) and eventlet / gevent
      (monkey-patched I/O, not for torch). Celery's `threads` pool would avoid billiard's process
      object, but it changes how every task of the deployment is started, which only the distributed
      test (tests/test_distributed.py) can prove;
    - Airflow's supervisor starts the task with a fresh interpreter (fork + exec) only on macOS, and
      that is not configurable.

    Why the rule it lifts does not apply: multiprocessing refuses children to a daemon so that they are
    not orphaned when it is terminated. Airflow 3's supervisor starts each task in a process group of
    its own and signals the whole group (os.killpg), so a killed task's children go with it, and every
    pool of ours ends with its step. Nothing changes anywhere else: the standard library's own process
    objects, daemonic or not, are left alone (a daemonic one keeps the rule).
    """
    current = multiprocessing.current_process()
    if not _forked_from_celery_pool_worker(current):
        return
    log.info("this task runs in a process forked from %s (%s, a Celery pool worker): taking a main-process "
             "identity so that it can start worker processes", current.name, type(current).__name__)  # fmt: skip
    multiprocessing.process._current_process = _TaskMainProcess()  # private: see above for why


def cpu_pool(n_items: int, workers: int | None, min_items: int, *, threads: int = 1) -> Executor:
    """`workers` processes (default: one per core) for `n_items` jobs' worth of decoding, or `threads`
    threads below `min_items` (or with one worker). Spawned, not forked: the caller may hold threads
    (boto3, Airflow's supervisor), and a forked copy of a held lock never unlocks."""
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers <= 1 or n_items < min_items:
        return ThreadPoolExecutor(max_workers=threads)
    allow_worker_processes()
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
