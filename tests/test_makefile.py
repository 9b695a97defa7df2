"""`make ui` with any VENV and PORT: the commands make would run, read without running them (`make -pn`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # each test runs make (a process), if only with -n


def _make(*args: str) -> str:
    if shutil.which("make") is None:
        pytest.fail("make is required (the README's set-up runs through it)")
    # -n: print the commands, run none (nothing is installed or started); -p: print the variables too.
    done = subprocess.run(["make", "-C", str(REPO), "-pn", *args], capture_output=True, text=True, timeout=60)
    return done.stdout


@pytest.mark.parametrize("venv", ["/opt/somewhere/venv", ".venv"])
def test_the_path_holds_the_venvs_bin_folder_absolute(venv, tmp_path):
    out = _make("ui", f"VENV={venv}", f"AIRFLOW_HOME={tmp_path}")
    path = next(line for line in out.splitlines() if line.startswith("PATH := "))
    first = path.removeprefix("PATH := ").split(":")[0]
    assert first == str((REPO / venv / "bin") if not venv.startswith("/") else Path(venv) / "bin")


def test_ui_moves_the_execution_api_url_with_the_port(tmp_path):
    out = _make("ui", "VENV=/opt/v", "PORT=8099", f"AIRFLOW_HOME={tmp_path}")
    assert "AIRFLOW__API__PORT=8099" in out
    assert "http://localhost:8099/execution/" in out and "/opt/v/bin/airflow standalone" in out
