"""Test set-up: an isolated Airflow home, quiet libraries, and the shared fixtures (tiny generated face
datasets, storages, a moto S3 server, Airflow's metadata database).

Only fixtures and hooks live here; the functions tests import are in helpers.py. Tests never read
../shared/data: every image here is generated.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import REPO, isolate_aws_env, write_dataset

_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="gender-airflow-test-"))
atexit.register(shutil.rmtree, _AIRFLOW_HOME, ignore_errors=True)

# Before anything imports Airflow: an isolated metadata database and this repo's DAGs.
os.environ["AIRFLOW_HOME"] = str(_AIRFLOW_HOME)
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(REPO / "plugins")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__LOGGING__LOGGING_LEVEL"] = "WARNING"
os.environ["GX_ANALYTICS_ENABLED"] = "False"
# Under pytest-xdist (`make test`) the workers share the cores: each worker's torch, and the processes it starts,
# take their share of them, so that two workers do not run four threads on two cores.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_CORE_SHARE = max(1, (os.cpu_count() or 2) // _WORKERS)
# A value the user set wins; the default is re-decided in each worker (which inherits the controller's environment).
_USER_THREADS = os.environ.get("GENDER_TEST_USER_TORCH_THREADS", os.environ.get("GENDER_TORCH_THREADS", ""))
os.environ["GENDER_TEST_USER_TORCH_THREADS"] = _USER_THREADS
os.environ["GENDER_TORCH_THREADS"] = _USER_THREADS or str(min(2, _CORE_SHARE))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(_CORE_SHARE))
for noisy in ("great_expectations", "matplotlib", "PIL"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


@pytest.fixture
def dataset_dir(tmp_path) -> Path:
    return write_dataset(tmp_path / "faces", 20)


@pytest.fixture
def local_storage(tmp_path):
    from gender_tasks.storage import LocalStorage

    return LocalStorage(tmp_path / "store")


@pytest.fixture(scope="session")
def airflow_db():
    """A migrated SQLite metadata database for tests that run the DAG."""
    import subprocess

    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True,
                   env=os.environ.copy(), timeout=600)  # fmt: skip
    return _AIRFLOW_HOME


# --- S3: moto's server mode, a real S3 API over HTTP on 127.0.0.1, once per session ---------------


@pytest.fixture(scope="session")
def moto_endpoint():
    """The endpoint URL of a local S3 server (moto, threaded, in this process) for the whole session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(moto_endpoint, monkeypatch, tmp_path) -> str:
    """boto3 pointed at the moto server the standard AWS way (variables), with test credentials."""
    isolate_aws_env(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-access-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-key")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    return moto_endpoint


@pytest.fixture
def s3_bucket(s3_env) -> str:
    """A fresh, empty bucket on the moto server."""
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=s3_env).create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_storage(s3_bucket):
    from gender_tasks.storage import S3Storage

    return S3Storage(s3_bucket, "pipeline")


@pytest.fixture
def mem_storage():
    """A fresh bucket prefix of the in-memory test backend (memory_storage.py), opened by its mem:// URI."""
    import uuid

    from memory_storage import drop_bucket

    from gender_tasks.storage import open_storage

    bucket = f"test-{uuid.uuid4().hex[:16]}"
    yield open_storage(f"mem://{bucket}/pipeline")
    drop_bucket(bucket)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.slow)])  # S3 through a moto server: slow tier
def any_storage(request):
    """Each storage backend in turn: a local folder, and a bucket prefix on the moto S3 server."""
    return request.getfixturevalue("local_storage" if request.param == "local" else "s3_storage")


# --- The order: the longest modules first --------------------------------------------------------

# The slow tier's longest modules, longest first (wall seconds on three workers, GENDER_TEST_CPU_LOG's second
# column: DAG runs, whole Airflows, every model exported or trained). `make test` hands whole modules to the
# xdist workers in collection order (--no-loadscope-reorder): these go first, so that no worker is left with
# one of them at the end while the others idle (the browser test's Airflow, 350 s, went fifth and ended last).
# Within a module the order stays as written.
_LONGEST_FIRST = ("test_ui_trigger.py", "test_e2e_dag.py", "test_gpu_check.py", "test_distributed.py", "test_export.py",
                  "test_hostile_sources.py", "test_tracking.py", "test_scoring.py", "test_train_predict.py",
                  "test_storage_outages.py", "test_ui_plugin.py", "test_local_airflow.py")  # fmt: skip


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


# --- Lines a test wants in pytest's closing summary, shown with or without -s ---------------------

_SUMMARY_LINES: list[tuple[str, str]] = []  # (title, text), from this process's tests or a worker's


@pytest.fixture
def terminal_summary(request):
    """`add(title, text)`: print `text` under `title` in pytest's terminal summary, after the results.

    The lines ride in the test's report (its user_properties), so that they reach the summary from an
    xdist worker as well as from this process."""

    def add(title: str, text: str) -> None:
        request.node.user_properties.append((_SUMMARY_PROPERTY, (title, text)))

    return add


_SUMMARY_PROPERTY = "gender_terminal_summary"


def pytest_runtest_logreport(report):
    if report.when == "teardown":  # the last report of a test: it carries every line the test added
        for name, value in report.user_properties:
            if name == _SUMMARY_PROPERTY:
                _SUMMARY_LINES.append(tuple(value))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for title, text in _SUMMARY_LINES:
        terminalreporter.write_sep("-", title)
        terminalreporter.write_line(text)


# --- CPU seconds per module, for sizing the tiers: GENDER_TEST_CPU_LOG=/path appends them there ----------

_CPU_LOG = os.environ.get("GENDER_TEST_CPU_LOG")
_CPU: dict[str, list[float]] = {}


def _cpu_seconds() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime  # children: the reaped ones


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if not _CPU_LOG:
        return (yield)
    import time

    cpu, wall = _cpu_seconds(), time.monotonic()
    try:
        return (yield)
    finally:
        totals = _CPU.setdefault(item.path.name, [0.0, 0.0])
        totals[0] += _cpu_seconds() - cpu
        totals[1] += time.monotonic() - wall


def pytest_sessionfinish(session, exitstatus):
    if _CPU_LOG and _CPU:
        with open(_CPU_LOG, "a") as fh:
            for name, (cpu, wall) in sorted(_CPU.items(), key=lambda kv: -kv[1][0]):
                fh.write(f"{cpu:8.1f} {wall:8.1f} {name}\n")
