"""Test set-up: an isolated Airflow home, quiet libraries, and tiny generated face datasets.

Tests never read ../shared/data: every image here is generated.
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

REPO = Path(__file__).resolve().parent.parent
_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="gender-airflow-test-"))
atexit.register(shutil.rmtree, _AIRFLOW_HOME, ignore_errors=True)

# Before anything imports Airflow: an isolated metadata database and this repo's DAGs.
os.environ["AIRFLOW_HOME"] = str(_AIRFLOW_HOME)
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(REPO / "plugins")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__LOGGING__LOGGING_LEVEL"] = "WARNING"
os.environ["GX_ANALYTICS_ENABLED"] = "False"
os.environ["GENDER_TORCH_THREADS"] = os.environ.get("GENDER_TORCH_THREADS", "2")
for noisy in ("great_expectations", "matplotlib", "PIL"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def make_face(label: str, rng, size: int = 48):
    """A synthetic 'face': the class shows in the colour and shape, noise makes every image unique."""
    import numpy as np
    from PIL import Image, ImageDraw

    base = np.clip(rng.normal(120, 40, (size, size, 3)), 0, 255).astype("uint8")
    img = Image.fromarray(base)
    draw = ImageDraw.Draw(img)
    m = size // 4
    if label == "female":
        draw.ellipse([m, m, size - m, size - m], fill=(230, 90, 120))
    else:
        draw.rectangle([m, m, size - m, size - m], fill=(60, 110, 220))
    return img


def write_dataset(root: Path, n_per_class: dict | int = 20, *, size: int = 48, folder_names=None, seed: int = 0,
                  fmt: str = "JPEG") -> Path:  # fmt: skip
    import numpy as np

    rng = np.random.default_rng(seed)
    counts = n_per_class if isinstance(n_per_class, dict) else {"female": n_per_class, "male": n_per_class}
    names = folder_names or {"female": "female", "male": "male"}
    suffix = ".jpg" if fmt == "JPEG" else ".png"
    for label, n in counts.items():
        folder = root / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            make_face(label, rng, size).save(folder / f"{label}_{i:04d}{suffix}", fmt)
    return root


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


def isolate_aws_env(monkeypatch, tmp_path) -> None:
    """No AWS configuration from this machine leaks into a test: no ~/.aws files, profile, instance metadata."""
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for var in ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
                "AWS_ENDPOINT_URL_S3", "AWS_MAX_ATTEMPTS", "GENDER_S3_CONN_ID"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)


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


# --- Lines a test wants in pytest's closing summary, shown with or without -s ---------------------

_SUMMARY_KEY = pytest.StashKey[list]()


@pytest.fixture
def terminal_summary(request):
    """`add(title, text)`: print `text` under `title` in pytest's terminal summary, after the results."""

    def add(title: str, text: str) -> None:
        request.config.stash.setdefault(_SUMMARY_KEY, []).append((title, text))

    return add


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for title, text in config.stash.get(_SUMMARY_KEY, []):
        terminalreporter.write_sep("-", title)
        terminalreporter.write_line(text)
