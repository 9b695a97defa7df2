"""Experiment tracking, opt-in: with MLFLOW_TRACKING_URI a run logs its settings, per-epoch metrics, test
metrics, report and model files, and a registered model per trained model, to a real MLflow backend (its
SQLite store, no mock); without it, nothing of mlflow is imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_dataset

from gender_tasks import layout, pipeline, tracking
from gender_tasks.storage import open_storage

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run (cnn and mobilenetv2, one epoch, their ensemble), trained once for the module, up to
    its report; returns (the run record, its trained and ensembled results)."""
    tmp = tmp_path_factory.mktemp("tracked")
    src = write_dataset(tmp / "faces", 12)
    run = pipeline.prepare({"source": str(src), "storage": str(tmp / "store"), "profile": "tiny", "epochs": 1,
                            "models": ["cnn", "mobilenetv2"], "min_rows": 10, "label_audit": False},
                           run_id="manual__tracked")  # fmt: skip
    run = pipeline.preprocess(pipeline.validate(pipeline.split(pipeline.ingest(run))))
    trained = [pipeline.train(run, m) for m in ("cnn", "mobilenetv2")]
    return run, trained, pipeline.ensemble(run)


_NO_MLFLOW = r"""
import json, sys
from gender_tasks import pipeline
run, trained, ensembled = json.loads(sys.argv[1])
out = pipeline.report(run, trained, ensembled=ensembled)
print(json.dumps({"mlflow": sorted(m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")),
                  "logged": "mlflow" in out}))
"""


@pytest.mark.slow
def test_a_run_without_mlflow_configured_imports_none_of_it(trained):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-c", _NO_MLFLOW, json.dumps(list(trained))], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"mlflow": [], "logged": False}


@pytest.mark.slow  # a subprocess imports every module
def test_importing_every_module_loads_no_mlflow():
    code = ("import sys, pkgutil, importlib, gender_tasks\n"
            "for m in pkgutil.walk_packages(gender_tasks.__path__, 'gender_tasks.'):\n"
            "    if not m.name.endswith('__main__'):\n"
            "        importlib.import_module(m.name)\n"
            "from gender_tasks import tracking\n"
            "assert tracking.enabled() is False and tracking.log_run(None, run_key='r', settings=None) is None\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'mlflow'))")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.slow
def test_a_run_logs_to_a_real_mlflow_sqlite_store(trained, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    run, trained_models, ensembled = trained
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)  # the store's default artifact root (./mlruns) lands here
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("GENDER_MLFLOW_EXPERIMENT", "tracked")
    out = pipeline.report(run, trained_models, ensembled=ensembled)
    logged = out["mlflow"]
    assert set(logged["model_versions"]) == {"cnn", "mobilenetv2", "ensemble"}

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    parent = client.get_run(logged["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.info.run_name == run["run_key"]
    assert parent.data.params["profile"] == "tiny" and json.loads(parent.data.params["models"]) == ["cnn",
                                                                                                   "mobilenetv2"]  # fmt: skip
    results = json.loads(open_storage(run["storage"]).get_bytes(layout.results_key(run["run_key"])))
    table = {row["model"]: row["ours"]["test_accuracy"] for row in results["table"]}
    for model in ("cnn", "mobilenetv2", "ensemble"):
        assert parent.data.metrics[f"{model}_test_accuracy"] == pytest.approx(table[model])
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "report")} == {"report/report.html",
                                                                                   "report/results.json"}  # fmt: skip

    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")  # fmt: skip
    by_model = {c.data.tags["gender.model"]: c for c in children}
    assert set(by_model) == {"cnn", "mobilenetv2", "ensemble"}
    storage = open_storage(run["storage"])
    for model in ("cnn", "mobilenetv2"):
        child = by_model[model]
        history = json.loads(storage.get_bytes(layout.model_file_key(run["run_key"], model, "history.json")))
        losses = client.get_metric_history(child.info.run_id, "loss")
        assert [(m.step, m.value) for m in losses] == [(h["epoch"], pytest.approx(h["loss"])) for h in history]
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val_accuracy")] == [1]
        assert "test_accuracy" in child.data.metrics and "test_weighted_f1" in child.data.metrics
        metrics = json.loads(storage.get_bytes(layout.model_file_key(run["run_key"], model, "metrics.json")))
        assert child.data.metrics["final_val_accuracy"] == pytest.approx(metrics["val_accuracy"])
        files = {a.path for a in client.list_artifacts(child.info.run_id, "model")}
        assert {"model/model.pt2", "model/model_card.json", "model/history.json"} <= files
        [version] = client.search_model_versions(f"name = 'gender-classification-{model}'")
        assert version.run_id == child.info.run_id and version.source.endswith("/model")
        # The registered artifact is the model file the run wrote, byte for byte.
        local = client.download_artifacts(child.info.run_id, "model/model.pt2", str(tmp_path / model))
        assert Path(local).read_bytes() == storage.get_bytes(layout.model_file_key(run["run_key"], model, "model.pt2"))

    # The report step again (a retry): nothing is logged twice.
    again = pipeline.report(run, trained_models, ensembled=ensembled)
    assert again["mlflow"]["already_logged"] is True and again["mlflow"]["mlflow_run_id"] == parent.info.run_id
    assert len(client.search_model_versions("name = 'gender-classification-cnn'")) == 1
    assert tracking.enabled()
