"""Test set-up: an isolated Airflow home, quiet libraries, and tiny generated face datasets.

Tests never read ../shared/data: every image here is generated.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="gender-airflow-test-"))

# Before anything imports Airflow: an isolated metadata database and this repo's DAGs.
os.environ["AIRFLOW_HOME"] = str(_AIRFLOW_HOME)
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(REPO / "plugins")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__LOGGING__LOGGING_LEVEL"] = "WARNING"
os.environ["GX_ANALYTICS_ENABLED"] = "False"
os.environ["GENDER_TORCH_THREADS"] = os.environ.get("GENDER_TORCH_THREADS", "2")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
sys.path.insert(0, str(REPO))
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
