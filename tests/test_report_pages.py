"""The plugin's pages without Airflow: failed runs that say why, downloads, runs side by side.

Fast: runs are made of files written here (results.json, predictions.csv, model outputs), not trained.
The browser checks of the same pages, in a real Airflow, are in test_ui_trigger.py.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from datetime import datetime

import pytest

from gender_tasks import layout
from gender_tasks.reporting import access
from gender_tasks.reporting.access import RunView, TaskView
from gender_tasks.storage import LocalStorage, put_recorded

SETTINGS_ERROR = ("SettingsError: unknown setting(s) ['epoch'] (did you mean 'epochs' instead of 'epoch'?); "
                  "expected some of ['epochs', 'seed']")  # fmt: skip


def _predictions(keys_labels: dict[str, str], right: set[str]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["key", "split", "label", "predicted", "prob_male"])
    writer.writerow(["train/x.jpg", "train", "male", "male", "0.9"])
    for key, label in keys_labels.items():
        wrong = "female" if label == "male" else "male"
        writer.writerow([key, "test", label, label if key in right else wrong, "0.5"])
    return out.getvalue().encode()


def _results(run_id: str, epochs: int, acc: dict[str, float], dataset_id: str = "ds-1") -> dict:
    table = [{"model": m, "ours": {"train_accuracy": a, "test_accuracy": a, "precision": a, "recall": a, "f1": a},
              "first": {"test_accuracy": a}, "ci": {"accuracy": [a - 0.1, min(1.0, a + 0.1)]}}
             for m, a in acc.items()]  # fmt: skip
    return {"run_id": run_id, "settings": {"profile": "tiny", "epochs": epochs, "seed": 42, "source": "/faces"},
            "dataset": {"dataset_id": dataset_id, "images": 40},
            "class_balance": {"splits": {"test": {"female": 5, "male": 5}}}, "table": table}  # fmt: skip


def _write_run(storage: LocalStorage, run_key: str, results: dict, test: dict[str, str], right: dict[str, set]):
    prefix = layout.run_prefix(run_key)
    put_recorded(storage, f"{prefix}/results.json", json.dumps(results).encode())
    storage.put_bytes(f"{prefix}/report.html", b"<!DOCTYPE html><html><body><main><h1>R</h1><!--run-links-->"
                      b"<table><tr data-model='cnn'><td>CNN<!--model-links:cnn--></td></tr></table></main></body></html>")  # fmt: skip
    storage.put_bytes(f"{prefix}/leases/holder.json", b"{}")  # not offered
    for model in right:
        files = {"predictions.csv": _predictions(test, right[model]), "metrics.json": b'{"test": {}}',
                 "history.json": b"[]", layout.MODEL_FILE: b"weights of " + model.encode()}  # fmt: skip
        for name, data in files.items():
            storage.put_bytes(layout.model_file_key(run_key, model, name), data)
        card = {"files": {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}}
        storage.put_bytes(layout.model_file_key(run_key, model, "model_card.json"), json.dumps(card).encode())
        storage.put_bytes(layout.model_file_key(run_key, model, layout.TRAINED_RECORD), b"{}")  # not offered


def _run(tmp_path, run_id: str, state: str = "success", **kw) -> RunView:
    tasks = [TaskView("prepare", state="success"), TaskView("train", 0, "cnn", "success"),
             TaskView("train", 1, "resnet50", "success"), TaskView("ensemble", state="success")]  # fmt: skip
    return RunView(run_id=run_id, state=state, record={"storage": str(tmp_path), "run_key": layout.run_key_for(run_id)},
                   started=datetime(2026, 1, 1), ended=datetime(2026, 1, 1, 0, 5), tasks=tasks, **kw)  # fmt: skip


TEST = {f"test/{i}.jpg": "male" if i % 2 else "female" for i in range(20)}


@pytest.fixture
def two_runs(tmp_path):
    storage = LocalStorage(tmp_path)
    a, b = _run(tmp_path, "manual__a"), _run(tmp_path, "manual__b")
    keys = sorted(TEST)
    # cnn: run a right on the first 10, run b on the first 18 (8 images only b got right, none only a)
    _write_run(storage, a.run_key, _results(a.run_id, 1, {"cnn": 0.5, "resnet50": 0.6}), TEST,
               {"cnn": set(keys[:10]), "resnet50": set(keys[:12])})  # fmt: skip
    _write_run(storage, b.run_key, _results(b.run_id, 3, {"cnn": 0.9, "resnet50": 0.6}), TEST,
               {"cnn": set(keys[:18]), "resnet50": set(keys[:12])})  # fmt: skip
    return storage, a, b


# --- failures ---------------------------------------------------------------------------------------


def test_a_failed_run_shows_the_failing_task_its_message_and_its_log():
    run = RunView(run_id="manual__2026-03-01T00:00:00+00:00", state="failed",
                  tasks=[TaskView("prepare", state="failed", error=SETTINGS_ERROR), TaskView("ingest", state="upstream_failed")])  # fmt: skip
    status, body = access.answer(run.run_id, run)
    assert status == 200 and "the run failed" in body
    assert "did you mean &#x27;epochs&#x27;" in body and "Traceback" not in body
    assert "href='/dags/gender_classification/runs/manual__2026-03-01T00%3A00%3A00%2B00%3A00/tasks/prepare'" in body
    assert "data-failed-task='ingest'" not in body  # upstream_failed is not a cause


def test_a_failed_mapped_task_links_to_its_own_instance_and_says_when_no_message_was_recorded():
    run = RunView(run_id="r", state="failed", tasks=[TaskView("train", 2, "inceptionv3", "failed")])
    body = access.failed_page(run)
    assert "train [inceptionv3]" in body and "/runs/r/tasks/train/mapped/2'" in body
    assert "No message recorded" in body


def test_a_run_marked_failed_by_hand_says_no_task_failed_and_links_the_grid():
    run = RunView(run_id="r", state="failed", tasks=[TaskView("train", 0, "cnn", "running")])
    body = access.failed_page(run)
    assert (
        "No task failed: the run was marked failed by hand" in body
        and "href='/dags/gender_classification/runs/r'" in body
    )
    assert "red square" not in body


def test_the_list_row_of_a_failed_run_gives_the_cause_and_the_log(tmp_path):
    failed = RunView(
        run_id="manual__f", state="failed", tasks=[TaskView("prepare", state="failed", error=SETTINGS_ERROR)]
    )
    body = access.render_index([failed], "/gender-reports")
    row = body[body.index("data-run-id='manual__f'") :]
    assert "<b>prepare</b>" in row and "did you mean" in row and "/runs/manual__f/tasks/prepare'" in row
    assert "name='run'" not in row  # nothing to compare in a run without results


# --- downloads --------------------------------------------------------------------------------------


def test_downloads_offer_the_run_files_and_each_models_outputs(two_runs):
    _, a, _ = two_runs
    files = access.downloads(a)
    assert files[:2] == ["results.json", "report.html"]
    for model in ("cnn", "resnet50"):
        assert [f for f in files if f.startswith(f"models/{model}/")] == [
            f"models/{model}/{name}" for name in layout.MODEL_OUTPUTS
        ]
    assert not any("leases" in f or layout.TRAINED_RECORD in f for f in files)
    data, filename, media = access.read_download(a, f"models/cnn/{layout.MODEL_FILE}")
    assert (
        data == b"weights of cnn"
        and filename == f"manual__a-models-cnn-{layout.MODEL_FILE}"
        and media == "application/octet-stream"
    )
    data, filename, media = access.read_download(a, "results.json")
    assert json.loads(data)["run_id"] == "manual__a" and media == "application/json"


def test_downloads_follow_the_layouts_model_outputs(two_runs, monkeypatch):
    """A renamed model file (another export format) is offered under its new name, with no code change here."""
    storage, a, _ = two_runs
    storage.put_bytes(layout.model_file_key(a.run_key, "cnn", "model.onnx"), b"exported")
    monkeypatch.setattr(layout, "MODEL_OUTPUTS", ("predictions.csv", "metrics.json", "model.onnx", "model_card.json"))
    files = access.downloads(a)
    assert "models/cnn/model.onnx" in files and f"models/cnn/{layout.MODEL_FILE}" not in files
    assert access.read_download(a, "models/cnn/model.onnx")[0] == b"exported"


@pytest.mark.parametrize("name", ["../secret.txt", "models/cnn/../../secret.txt", "leases/holder.json",
                                  "models/cnn/trained.json", "/etc/passwd", "models/cnn", "", "datasets/x"])  # fmt: skip
def test_only_offered_files_are_served(two_runs, name, tmp_path):
    (tmp_path / "secret.txt").write_text("no")
    _, a, _ = two_runs
    with pytest.raises(access.DownloadError) as err:
        access.read_download(a, name)
    assert err.value.status == 404


def test_a_download_that_does_not_match_its_recorded_checksum_is_refused(two_runs):
    storage, a, _ = two_runs
    storage.put_bytes(layout.model_file_key(a.run_key, "cnn", layout.MODEL_FILE), b"tampered")
    with pytest.raises(access.DownloadError) as err:
        access.read_download(a, f"models/cnn/{layout.MODEL_FILE}")
    assert err.value.status == 500 and "checksum" in str(err.value)


def test_the_report_is_served_with_its_links_and_downloads(two_runs):
    _, a, _ = two_runs
    status, body = access.answer(a.run_id, a, "/gender-reports")
    assert status == 200 and "<!--run-links-->" not in body
    assert "href='/dags/gender_classification/runs/manual__a'" in body  # the run in the grid
    row = body[body.index("data-model='cnn'") :]
    assert row.index("/runs/manual__a/tasks/train/mapped/0'") < row.index("</tr>")  # the model's training log
    for name in access.downloads(a):
        assert f"/gender-reports/download?run=manual__a&amp;file={name.replace('/', '%2F')}" in body


# --- comparison -------------------------------------------------------------------------------------


def test_mcnemar_exact_matches_scipys_binomial_test():
    from scipy.stats import binomtest

    for a in range(0, 15):
        for b in range(0, 15):
            expected = 1.0 if a + b == 0 else binomtest(min(a, b), a + b, 0.5).pvalue
            assert access.mcnemar_exact(a, b) == pytest.approx(expected, abs=1e-12)


def test_two_runs_side_by_side(two_runs):
    _, a, b = two_runs
    c = access.comparison([a, b], [access.read_results(a), access.read_results(b)])
    assert c["settings"] == [{"setting": "epochs", "values": [1, 3]}]
    cnn_b = next(t for t in c["table"] if t["model"] == "cnn" and t["run"] == 1)
    assert cnn_b["deltas"]["test_accuracy"] == pytest.approx(0.4) and cnn_b["ci"] == [0.8, 1.0]
    paired = {p["model"]: p["test"] for p in c["paired"]}
    assert paired["cnn"]["only_a_right"] == 0 and paired["cnn"]["only_b_right"] == 8
    assert paired["cnn"]["p_value"] == pytest.approx(2 / 2**8) and paired["cnn"]["significant"]
    assert paired["resnet50"]["p_value"] == 1.0 and not paired["resnet50"]["significant"]
    page = access.render_comparison([a, b], [access.read_results(a), access.read_results(b)], "/gender-reports")
    assert "<meta name='viewport'" in page and "id='compare-paired'" in page and "+0.400" in page
    rows = {m: re.search(rf"<tr data-paired='{m}'>(.*?)</tr>", page).group(1) for m in ("cnn", "resnet50")}
    assert "<td>significant</td>" in rows["cnn"]
    # Both runs' ResNet50 right on the same 12 images: no difference, not "could be noise".
    assert (paired["resnet50"]["only_a_right"], paired["resnet50"]["only_b_right"]) == (0, 0)
    assert "no difference: right and wrong on the same images" in rows["resnet50"]
    assert "could be noise" not in rows["resnet50"]


def test_runs_on_different_test_splits_get_no_paired_test(two_runs, tmp_path):
    storage, a, _ = two_runs
    c_run = _run(tmp_path, "manual__c")
    other = {k.replace("test/", "other/"): v for k, v in TEST.items()}
    _write_run(storage, c_run.run_key, _results(c_run.run_id, 1, {"cnn": 0.7}, "ds-2"), other, {"cnn": set()})
    c = access.comparison([a, c_run], [access.read_results(a), access.read_results(c_run)])
    assert [p["test"] for p in c["paired"]] == [None]
    assert {d["item"]: d["same"] for d in c["data"]}["dataset"] is False
    page = access.render_comparison([a, c_run], [access.read_results(a), access.read_results(c_run)], "/x")
    assert "Different test splits" in page


def test_a_comparison_of_an_unfinished_run_says_which(two_runs, tmp_path):
    _, a, _ = two_runs
    running = _run(tmp_path, "manual__running", state="running")
    page = access.render_comparison([a, running], [access.read_results(a), None], "/gender-reports")
    assert "manual__running" in page and "no results yet" in page


def test_the_list_offers_comparison_and_downloads(two_runs):
    _, a, b = two_runs
    body = access.render_index([a, b], "/gender-reports")
    assert "<form method='get' action='/gender-reports/compare'>" in body
    assert "name='run' value='manual__a'" in body and "name='run' value='manual__b'" in body
    assert "/gender-reports/download?run=manual__b&amp;file=results.json" in body
    assert "<meta name='viewport'" in body and "class='scroll'" in body


# --- what the DAG records for these pages ----------------------------------------------------------


class _FakeTI:
    def __init__(self):
        self.pushed: list[tuple[str, object]] = []

    def xcom_push(self, key, value):
        self.pushed.append((key, value))


@pytest.fixture
def dag_module(monkeypatch):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "dags" / "gender_classification.py"
    spec = importlib.util.spec_from_file_location("dag_failures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ti = _FakeTI()
    monkeypatch.setattr(module, "get_current_context", lambda: {"ti": ti})
    return module, ti


def test_a_failing_step_records_its_message_for_the_pages(dag_module):
    from airflow.sdk.exceptions import AirflowFailException

    from gender_tasks.settings import SettingsError

    module, ti = dag_module
    with pytest.raises(AirflowFailException), module._failures_for_airflow():
        raise SettingsError("unknown setting(s) ['epoch'] (did you mean 'epochs' instead of 'epoch'?)")
    assert ti.pushed == [("failure", {"error": "SettingsError: unknown setting(s) ['epoch'] (did you mean 'epochs' "
                                               "instead of 'epoch'?)", "permanent": True})]  # fmt: skip
    ti.pushed.clear()
    with pytest.raises(ConnectionError), module._failures_for_airflow():  # retried as it was, recorded too
        raise ConnectionError("s3://bucket: connection refused")
    assert ti.pushed == [("failure", {"error": "ConnectionError: s3://bucket: connection refused", "permanent": False})]


def test_a_nested_step_records_once(dag_module):
    """train and label_audit wrap `_call` (which records) in a second `_failures_for_airflow`."""
    from airflow.sdk.exceptions import AirflowFailException

    from gender_tasks.errors import PermanentError

    module, ti = dag_module
    with pytest.raises(AirflowFailException), module._failures_for_airflow(), module._failures_for_airflow():
        raise PermanentError("model 'cnn' has no plan for profile 'x'")
    assert [v["error"] for _, v in ti.pushed] == ["PermanentError: model 'cnn' has no plan for profile 'x'"]
