"""The whole DAG, end to end, in-process (Airflow's dag.test()) on a tiny generated dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import write_dataset

REPO = Path(__file__).resolve().parent.parent
MODELS = ("inceptionv3", "cnn")  # the slowest first, as the DAG maps them


@pytest.mark.slow
def test_dag_runs_end_to_end_with_repeats_an_ensemble_and_the_corrected_test(airflow_db, tmp_path):
    """Two repeats (the fewest that have an interval): two models and their ensemble, each repeat on its own
    split, the corrected tests, intervals inside [0, 1], and the model asset published.

    The CNN and InceptionV3: the custom network and a transfer model at two input sizes (32 and 75 px: two
    caches, and the external evaluation decodes at both). ResNet50 and MobileNetV2 would add only training
    time (each model's export is tested in test_export.py, with the ensemble of members of two sizes; its
    forward and backward in test_models.py; MobileNetV2 runs through the DAG in the S3 test below)."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.utils.state import DagRunState

    from gender_tasks.layout import cache_prefix, run_key_for
    from gender_tasks.storage import LocalStorage

    source = write_dataset(tmp_path / "faces", 24)
    store = tmp_path / "store"
    dag = DagBag(dag_folder=str(REPO / "dags")).dags["gender_classification"]
    run = dag.test(run_conf={"source": str(source), "storage": str(store), "profile": "tiny", "epochs": 1,
                             "repeats": 2, "models": list(MODELS),
                             "external_eval": [str(write_dataset(tmp_path / "ext", 4, seed=3))]})  # fmt: skip
    assert run.state == DagRunState.SUCCESS

    storage = LocalStorage(store)
    run_key = run_key_for(run.run_id)
    html = storage.get_bytes(f"runs/{run_key}/report.html").decode()
    results = json.loads(storage.get_bytes(f"runs/{run_key}/results.json"))
    models = {row["model"]: row for row in results["table"]}
    assert set(models) == {*MODELS, "ensemble"}
    assert models["ensemble"]["paper"] is None  # the study had no ensemble: its column stays empty
    repeats = results["repeats"]
    assert repeats["repeats"] == 2 and repeats["seeds"] == [42, 43]
    for name, row in models.items():
        assert f'data-model="{name}"' in html
        for metric in ("train_accuracy", "test_accuracy", "precision", "recall", "f1"):
            assert 0.0 <= row["ours"][metric] <= 1.0, (name, metric)
            # Table 1's "ours" is the mean over the repeats, with its interval.
            summary = repeats["summary"][name][metric]
            assert row["ours"][metric] == summary["mean"] and summary["n"] == 2
            assert summary["min"] <= summary["mean"] <= summary["max"]
            # Bounded metrics get bounded intervals, even from 2 repeats (a t-interval gave [-0.97, 1.86]).
            assert 0.0 <= summary["ci_low"] <= summary["ci_high"] <= 1.0, (name, metric, summary)
        per_repeat = [r[name]["test_accuracy"] for r in repeats["per_repeat"]]
        assert repeats["summary"][name]["test_accuracy"]["std"] == pytest.approx(np.std(per_repeat, ddof=1))
    assert sum(repeats["rank_first"]["alone"].values()) + len(repeats["ties"]) == 2  # whole counts, ties apart
    assert len(repeats["corrected_tests"]) == 3  # every pair of the 2 models and the ensemble
    assert all(t["df"] == 1 for t in repeats["corrected_tests"])
    for section in ('id="repeats-summary"', 'id="rank-first"', 'id="corrected-tests"', "Nadeau", 'id="setup-data"'):
        assert section in html, section
    # Every repeat trained in its own folder, on its own split.
    splits = {
        json.loads(storage.get_bytes(f"{prefix}models/cnn/model_card.json"))["seed"]
        for prefix in (f"runs/{run_key}/", f"runs/{run_key}/repeats/1/")
    }
    assert splits == {42, 43}
    assert storage.exists(f"runs/{run_key}/repeats/1/models/ensemble/model.pt2")
    assert set(results["external"][0]["models"]) == set(models)  # the ensemble too, from its export
    assert results["class_balance"]["totals"] == {"female": 24, "male": 24}
    dataset_id = results["dataset"]["dataset_id"]
    for size in (32, 75):  # a cache per input size: the CNN's and InceptionV3's
        assert list(storage.list(cache_prefix(dataset_id, size))), size

    # The report published the models: an event of the model asset names the run (gender_scoring runs on it).
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        extras = session.scalars(select(AssetEvent.extra).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
                                 .where(AssetModel.name == "gender_classification_models")).all()  # fmt: skip
    assert {"run_key": run_key, "storage": storage.uri} in extras
    assert results["validation"]["success"] is True
    # Mapped training tasks are named after their model in the UI.
    names = {ti.rendered_map_index for ti in run.get_task_instances() if ti.task_id == "train"}
    assert names == {f"{m} #{r}" for m in MODELS for r in range(2)}


@pytest.mark.slow
@pytest.mark.parametrize(
    "spoil, failing_task",
    [
        # A file that does not decode is refused by ingest's scan, before anything is written.
        (lambda root: (root / "male" / "corrupt.jpg").write_bytes(b"\xff\xd8 not an image"), "ingest"),
        # Readable data that breaks an expectation (a class under min_class_share) stops at validation.
        (lambda root: write_dataset(root, {"female": 40, "male": 6}, seed=3), "validate"),
    ],
)
def test_bad_data_stops_the_run_without_retrying(airflow_db, tmp_path, spoil, failing_task):
    from airflow.dag_processing.dagbag import DagBag
    from airflow.utils.state import DagRunState, TaskInstanceState

    source = tmp_path / "faces"
    if failing_task == "ingest":
        write_dataset(source, 12)
    spoil(source)
    dag = DagBag(dag_folder=str(REPO / "dags")).dags["gender_classification"]
    run = dag.test(run_conf={"source": str(source), "storage": str(tmp_path / "store"), "profile": "tiny"})
    assert run.state == DagRunState.FAILED
    tis = {ti.task_id: ti for ti in run.get_task_instances()}
    assert tis[failing_task].state == TaskInstanceState.FAILED
    assert tis[failing_task].try_number == 1  # a PermanentError: failed at once, not retried
    assert {tis["train"].state, tis["report"].state} <= {TaskInstanceState.UPSTREAM_FAILED, None}


@pytest.mark.slow
def test_dag_runs_on_s3_storage_and_a_second_run_uploads_nothing(airflow_db, tmp_path, s3_bucket, capfd):
    """The whole DAG with its storage in a bucket of a real S3 API (moto's server on 127.0.0.1); the
    second run, of one model, skips the ensemble."""
    import boto3
    from airflow.dag_processing.dagbag import DagBag
    from airflow.utils.state import DagRunState

    from gender_tasks.layout import run_key_for
    from gender_tasks.storage import S3Storage

    source = write_dataset(tmp_path / "faces", 16)
    conf = {"source": str(source), "storage": f"s3://{s3_bucket}/pipeline", "profile": "tiny", "epochs": 1,
            "models": ["cnn", "mobilenetv2"], "label_audit": False}  # fmt: skip
    dag = DagBag(dag_folder=str(REPO / "dags")).dags["gender_classification"]
    first = dag.test(run_conf=conf)
    assert first.state == DagRunState.SUCCESS
    # Switched-off steps end skipped, not green, and the report lists no time for them.
    states = {ti.task_id: ti.state for ti in first.get_task_instances()}
    assert states["label_audit"] == "skipped" and states["evaluate_external"] == "skipped"
    assert states["report"] == "success"
    # The report reads the switched-off steps' reasons, not missing results (which Airflow logs as errors).
    out = capfd.readouterr()
    assert "XCom not found" not in out.out + out.err
    storage = S3Storage(s3_bucket, "pipeline")
    results = json.loads(storage.get_bytes(f"runs/{run_key_for(first.run_id)}/results.json"))
    assert "label audit" not in results["task_durations"] and "train cnn" in results["task_durations"]
    dataset_id = results["dataset"]["dataset_id"]
    images = [k for k in storage.list(f"datasets/{dataset_id}/images/")]
    assert len(images) == 32 and results["dataset"]["uploaded"] == 32
    assert storage.exists(f"datasets/{dataset_id}/manifest.csv")
    assert storage.exists(f"runs/{run_key_for(first.run_id)}/report.html")

    s3 = boto3.client("s3")
    before = _objects(s3, s3_bucket, "pipeline/datasets/")
    # The second run trains one of the two models, with an external set: its ensemble ends skipped like a
    # switched-off step, and the external evaluation after it still runs.
    second = dag.test(run_conf={**conf, "models": ["cnn"],
                                "external_eval": [str(write_dataset(tmp_path / "ext", 4, seed=3))]})  # fmt: skip
    assert second.state == DagRunState.SUCCESS
    states = {ti.task_id: ti.state for ti in second.get_task_instances()}
    assert states["ensemble"] == "skipped" and states["label_audit"] == "skipped"
    assert states["evaluate_external"] == "success" and states["report"] == "success"
    out = capfd.readouterr()
    assert "XCom not found" not in out.out + out.err
    second_key = run_key_for(second.run_id)
    again = json.loads(storage.get_bytes(f"runs/{second_key}/results.json"))
    assert again["dataset"]["dataset_id"] == dataset_id and again["dataset"]["uploaded"] == 0
    # The report says why there is no ensemble, and lists no time for it.
    reason = "an ensemble needs at least two models; this run trains only cnn"
    assert again["ensemble"] is None and again["ensemble_skipped"] == reason
    assert "ensemble" not in again["task_durations"] and "external evaluation" in again["task_durations"]
    assert [row["model"] for row in again["table"]] == ["cnn"] and again["external"][0]["models"].keys() == {"cnn"}
    assert reason in storage.get_bytes(f"runs/{second_key}/report.html").decode()
    # The dataset, its split, its caches and its trained model: nothing new, nothing rewritten (same content
    # and timestamps): the second run trained nothing and copied the keyed model into its own folder.
    assert _objects(s3, s3_bucket, "pipeline/datasets/") == before
    record = json.loads(storage.get_bytes(f"runs/{second_key}/models/cnn/trained.json"))
    assert record["reused"] is True
    assert not storage.exists(f"runs/{second_key}/models/ensemble/model.pt2")


def _objects(s3, bucket: str, prefix: str) -> dict:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: (o["ETag"], o["LastModified"]) for page in pages for o in page.get("Contents", [])}
