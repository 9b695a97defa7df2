"""The embedded Airflow of `python -m gender_tasks run`: one DAG registration at a time, and runs whose
process is gone recognised and ended.

Two problems of running `dag.test()` from several processes on one AIRFLOW_HOME:

- Registration races. `dag.test()` first writes the DAG bundle, the DAG and its assets to the metadata
  database, each as select-then-insert. Two first runs on a fresh database both see nothing and both
  insert: one dies with `UNIQUE constraint failed: dag_bundle.name` (or `asset.name`). `register_dag`
  does that registration under an exclusive file lock (fcntl) in AIRFLOW_HOME, so the second process
  finds the rows present and `dag.test()`'s own registration writes nothing new.
- Stale runs. A `run` killed with SIGKILL leaves its DagRun `running`: with `max_active_runs=1` every run
  the scheduler would start afterwards waits `queued` behind it. Each `run` holds a lock file named
  after its run id for as long as it lives (the kernel drops the lock when the process dies, however
  it dies); `end_stale_runs` fails every running or queued run that `dag.test()` made (triggered_by
  TEST) whose lock nobody holds. Runs the scheduler started are left alone: a dead worker's tasks are
  the scheduler's business (its heartbeat-timeout detection fails or retries them).

Imports Airflow: only `cli` uses this, after it has set the embedded defaults.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from .environment import get_path
from .layout import run_key_for

log = logging.getLogger(__name__)

STATE_DIR = "gender_tasks"  # under AIRFLOW_HOME
SETUP_LOCK = "setup.lock"
RUN_LOCKS = "runs"


def _state_dir() -> Path:
    home = get_path("AIRFLOW_HOME")
    if home is None:  # cli.airflow_env_defaults sets it before any command gets here
        raise RuntimeError("AIRFLOW_HOME is not set: run through python -m gender_tasks, which sets it")
    path = home / STATE_DIR
    (path / RUN_LOCKS).mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def setup_lock() -> Iterator[None]:
    """Exclusive across processes on this AIRFLOW_HOME while held; waits for the holder to finish."""
    with open(_state_dir() / SETUP_LOCK, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def run_lock_path(run_id: str) -> Path:
    return _state_dir() / RUN_LOCKS / f"{run_key_for(run_id)}.lock"


@contextlib.contextmanager
def claim_run(run_id: str) -> Iterator[None]:
    """Hold the lock file of `run_id` while this process runs it: its DagRun is alive while the lock is held."""
    path = run_lock_path(run_id)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh run id: nobody else has it
        fh.truncate(0)
        fh.write(json.dumps({"run_id": run_id, "pid": os.getpid(), "host": socket.gethostname(),
                             "started": dt.datetime.now(dt.UTC).isoformat()}))  # fmt: skip
        fh.flush()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run_is_alive(run_id: str) -> bool:
    """Whether a live process holds the run's lock. No lock file: no live `run` ever claimed it (a run of an
    earlier version, or one started by other dag.test() callers on this AIRFLOW_HOME) and it counts as gone."""
    path = run_lock_path(run_id)
    if not path.exists():
        return False
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    path.unlink(missing_ok=True)  # its holder is dead
    return False


def end_stale_runs(dag_id: str) -> list[str]:
    """Fail every running or queued run of `dag_id` made by dag.test() whose process is gone; their run ids."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState, State, TaskInstanceState
    from airflow.utils.types import DagRunTriggeredByType
    from sqlalchemy import select

    ended = []
    with create_session() as session:
        runs = session.scalars(select(DagRun).where(
            DagRun.dag_id == dag_id, DagRun.state.in_([DagRunState.RUNNING, DagRunState.QUEUED]),
            DagRun.triggered_by == DagRunTriggeredByType.TEST,
        )).all()  # fmt: skip
        for run in runs:
            if _run_is_alive(run.run_id):
                continue
            was = run.state
            for ti in run.get_task_instances(session=session):
                if ti.state not in State.finished:
                    # Started ones were killed with the process; the others can no longer run.
                    ti.state = TaskInstanceState.FAILED if ti.state else TaskInstanceState.UPSTREAM_FAILED
            run.set_state(DagRunState.FAILED)
            ended.append(run.run_id)
            log.warning("ended stale run %s of %s: it was %s but the process that ran it is gone (killed?); "
                        "marked failed so later runs do not queue behind it", run.run_id, dag_id,
                        was)  # fmt: skip
    return ended


def register_dag() -> None:
    """Write the DAG bundles, the DAGs and their assets to the metadata database, as dag.test() does first,
    but one process at a time (see the module docstring)."""
    from airflow import settings
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import BundleDagBag, sync_bag_to_db

    session = settings.Session()
    try:
        manager = DagBundlesManager()
        manager.sync_bundles_to_db(session=session)
        session.commit()
    finally:
        session.close()
    for bundle in manager.get_all_dag_bundles():
        if not bundle.is_initialized:
            bundle.initialize()
        bag = BundleDagBag(dag_folder=bundle.path, bundle_path=bundle.path, bundle_name=bundle.name)
        sync_bag_to_db(bag, bundle.name, bundle.version)


def prepare_airflow(dag_id: str) -> list[str]:
    """Before a run: under the setup lock, end stale runs and register the DAG. Returns the ended run ids."""
    with setup_lock():
        ended = end_stale_runs(dag_id)
        register_dag()
    return ended
