import json

import numpy as np
import pytest
from helpers import write_dataset

from gender_tasks import pipeline
from gender_tasks.evaluation.stats import bootstrap_ci, mcnemar
from gender_tasks.storage import open_storage


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_n():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 1000)
    pred = np.where(rng.random(1000) < 0.9, y, 1 - y)
    ci = bootstrap_ci(y, pred)
    acc = (y == pred).mean()
    assert ci["accuracy"][0] < acc < ci["accuracy"][1]
    assert ci["accuracy"][1] - ci["accuracy"][0] < 0.05
    small = bootstrap_ci(y[:100], pred[:100])
    assert small["accuracy"][1] - small["accuracy"][0] > ci["accuracy"][1] - ci["accuracy"][0]


def test_mcnemar_separates_noise_from_real_differences():
    y = np.zeros(1000, dtype=int)
    a = y.copy()
    b = y.copy()
    b[:10] = 1  # b wrong on 10 images a gets right
    a[10:15] = 1  # a wrong on 5 images b gets right
    assert mcnemar(y, a, b)["p_value"] > 0.05
    b[:60] = 1
    res = mcnemar(y, a, b)
    assert (res["only_a_right"], res["only_b_right"]) == (55, 0)
    assert res["p_value"] < 0.001


def _with_labels_csv(root, rng_seed=0):
    """Give a generated dataset a labels.csv with an attribute, as ../shared/data's folders have."""
    import pandas as pd

    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))
    ages = [20 + (i * 7) % 50 for i in range(len(files))]
    pd.DataFrame({"file": files, "label": [f.split("/")[0] for f in files], "age": ages,
                  "ethnicity": ["<i>a</i>" if i % 2 else "b" for i in range(len(files))]}).to_csv(
        root / "labels.csv", index=False)  # fmt: skip
    return root


@pytest.mark.slow
def test_report_shows_every_section_and_escapes_data(tmp_path):
    # A source folder name and an attribute value that try to inject markup.
    src = _with_labels_csv(write_dataset(tmp_path / "<script>alert(1)</script>", 16))
    external = _with_labels_csv(write_dataset(tmp_path / "real", 10, seed=5))
    run = pipeline.prepare({"source": str(src), "storage": str(tmp_path / "store"), "profile": "tiny",
                            "models": ["cnn", "mobilenetv2"], "min_rows": 10, "epochs": 1,
                            "label_audit_folds": 3, "external_eval": [str(external) + "?age >= 30"]},
                           run_id="manual__<b>x</b>")  # fmt: skip
    run = {**pipeline.ingest(run), "run_key": "run1"}
    assert run["dataset"]["attributes"] == 2
    run = pipeline.preprocess(pipeline.validate(pipeline.split(run)))
    trained = [pipeline.train(run, m) for m in run["settings"]["models"]]
    audit = pipeline.label_audit(run)
    assert audit["images"] == 32 and audit["folds"] == 3
    ext = pipeline.evaluate_external(run)
    assert ext["sets"] == ["real_age_30"]
    out = pipeline.report(run, trained, label_audit=audit, external=ext)
    storage = open_storage(run["storage"])
    html = storage.get_bytes("runs/run1/report.html").decode()
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;" in html
    assert "<b>x</b>" not in html and "<i>a</i>" not in html and "&lt;i&gt;a&lt;/i&gt;" in html
    assert 'data-model="cnn"' in html and 'data-model="mobilenetv2"' in html
    for section in ("Table 1", "Uncertainty", "Class-balance audit", "Accuracy per group", "Label-quality audit",
                    "External evaluation sets", "Data validation", "Run metadata"):  # fmt: skip
        assert section in html
    assert html.count("<svg") >= 6  # curves, confusion matrix and ROC per model
    assert html.count('<img src="data:image/png;base64,') == 24  # the most suspicious labels, as thumbnails
    results = json.loads(storage.get_bytes("runs/run1/results.json"))
    assert {r["model"] for r in results["table"]} == {"cnn", "mobilenetv2"}
    assert len(results["comparisons"]) == 1
    assert {g["attribute"] for g in results["group_accuracy"]["cnn"]} == {"age", "ethnicity"}
    (ext_set,) = results["external"]
    assert ext_set["filter"] == "age >= 30" and 0 < ext_set["images"] < 20
    assert set(ext_set["models"]) == {"cnn", "mobilenetv2"}
    assert 0 <= ext_set["models"]["cnn"]["accuracy"] <= 1
    audit_rows = results["label_audit"]["top"]
    assert [r["p_given_label"] for r in audit_rows] == sorted(r["p_given_label"] for r in audit_rows)
    assert set(out["test_accuracy"]) == {"cnn", "mobilenetv2"}
