"""The package's shape: light imports where the UI needs them, layered stages, models by registry entry."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import write_dataset
from torch import nn

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "sklearn", "scipy", "pandas")


@pytest.mark.slow  # a fresh interpreter
def test_serving_a_report_loads_no_training_stack(tmp_path):
    """What the UI plugin imports to serve a report (in a fresh interpreter) loads none of the heavy libraries."""
    from gender_tasks.layout import report_key

    store = tmp_path / "store"
    (store / report_key("manual_1")).parent.mkdir(parents=True)
    (store / report_key("manual_1")).write_text("<p>the report</p>")
    code = (
        "import sys\n"
        "from gender_tasks.reporting.access import RunView, answer, render_index\n"
        f"run = RunView('manual_1', 'success', record={{'storage': {str(store)!r}, 'run_key': 'manual_1'}})\n"
        "status, body = answer('manual_1', run)\n"
        "assert status == 200 and '<p>the report</p>' in body\n"
        "assert 'manual_1' in render_index([run], '/r')\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    lint = Path(sys.executable).parent / "lint-imports"
    return subprocess.run([str(lint), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})  # fmt: skip


@pytest.mark.slow  # runs lint-imports twice
def test_the_import_contract_holds_and_catches_a_cycle(tmp_path):
    assert _lint_imports(REPO).returncode == 0
    # A copy of the package in which the data stage imports the training stage (a layer above it).
    copy = tmp_path / "copy"
    shutil.copytree(REPO / "gender_tasks", copy / "gender_tasks", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    shutil.copy(REPO / "pyproject.toml", copy / "pyproject.toml")
    ingest = copy / "gender_tasks" / "data" / "ingest.py"
    ingest.write_text(ingest.read_text() + "\nfrom ..training import trainer  # noqa\n")
    broken = _lint_imports(copy)
    assert broken.returncode != 0
    assert "gender_tasks.data.ingest -> gender_tasks.training.trainer" in broken.stdout


# --- a fifth model is one registry entry ---------------------------------------------------------------


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_tiny(image_size: int, weights: str = "none") -> nn.Module:
    return TinyNet()


@pytest.fixture
def tiny_model():
    from gender_tasks.models.registry import ModelSpec, ProfilePlan, register, unregister

    plan = ProfilePlan(image_size=32, epochs=1)
    register(ModelSpec(name="tinynet", display_name="TinyNet", builder=f"{__name__}:build_tiny", min_image_size=8,
                       profiles={"paper": plan, "cpu": plan, "tiny": plan}, relative_cost=1, head=("head",)))  # fmt: skip
    yield "tinynet"
    unregister("tinynet")


@pytest.mark.slow
def test_a_registered_model_trains_and_reaches_the_report(tiny_model, tmp_path):
    from gender_tasks import pipeline
    from gender_tasks.layout import report_key, results_key
    from gender_tasks.scheduling import order_slowest_first
    from gender_tasks.settings import form_fields
    from gender_tasks.storage import open_storage

    assert tiny_model in form_fields()["models"]["items"]["enum"]
    assert order_slowest_first(["cnn", tiny_model]) == ["cnn", tiny_model]
    src = write_dataset(tmp_path / "faces", 12)
    run = pipeline.prepare({"source": str(src), "storage": str(tmp_path / "store"), "profile": "tiny",
                            "models": ["cnn", tiny_model], "label_audit": False}, run_id="extra")  # fmt: skip
    run = pipeline.preprocess(pipeline.validate(pipeline.split(pipeline.ingest(run))))
    trained = [pipeline.train(run, name) for name in run["settings"]["models"]]
    pipeline.report(run, trained)
    storage = open_storage(run["storage"])
    results = json.loads(storage.get_bytes(results_key("extra")))
    row = next(r for r in results["table"] if r["model"] == tiny_model)
    assert row["label"] == "TinyNet" and row["paper"] is None and 0 <= row["ours"]["test_accuracy"] <= 1
    assert "TinyNet" in storage.get_bytes(report_key("extra")).decode()
