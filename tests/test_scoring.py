"""Batch scoring (gender_tasks.scoring, dags/gender_scoring.py, plugins/gender_scoring_view.py): the model
chosen on validation, predictions and a summary written, hostile input refused with nothing written,
resumable, and a rescoring of unchanged images with the same model doing nothing."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import make_face

from gender_tasks import layout, scoring
from gender_tasks.errors import PermanentError
from gender_tasks.integrity import sha256_hex
from gender_tasks.storage import LocalStorage, open_storage

REPO = Path(__file__).resolve().parent.parent
# The tests are slow (store exports models with torch.export; most start decode workers, a process or the DAG)
# but for the unit tests of the DAG's inputs, of the choice among flagged models and of the summary's warning.


def _flat(folder: Path, n: int, seed: int = 7) -> Path:
    """n new, unlabeled images in one folder (no class folders)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        make_face("female" if i % 2 else "male", rng).save(folder / f"img_{i:03d}.jpg", "JPEG")
    return folder


def write_run(storage, run_key: str, models: dict[str, tuple[int, float]], *, train_images: int = 6) -> None:
    """A finished training run as the pipeline leaves it: each model's model.pt2 (an untrained network,
    exported as training exports it), predictions.csv naming stored training images, metrics, a card with
    every file's sha256 and its validation accuracy; then results.json, the run's last write."""
    import torch

    from gender_tasks.models.registry import get_model_spec
    from gender_tasks.training.export import export_model

    rng = np.random.default_rng(0)
    keys = []
    for i in range(train_images):
        buf = io.BytesIO()
        make_face("female" if i % 2 else "male", rng).save(buf, "JPEG")
        key = layout.image_key("ds-test", "female", sha256_hex(buf.getvalue()), "x.jpg")
        storage.put_bytes(key, buf.getvalue())
        keys.append(key)
    preds = pd.DataFrame({"key": keys, "split": "train", "label": "female", "prob_male": 0.4, "predicted": "female"})
    for name, (size, val) in models.items():
        torch.manual_seed(len(name))
        files = {"predictions.csv": preds.to_csv(index=False).encode(),
                 "metrics.json": json.dumps({"model": name, "val_accuracy": val, "image_size": size}).encode(),
                 "model.pt2": export_model(get_model_spec(name).build(size, "none"), name, size, {})}  # fmt: skip
        for file, data in files.items():
            storage.put_bytes(layout.model_file_key(run_key, name, file), data)
        card = {"model": name, "val_accuracy": val, "image_size": size,
                "files": {f: sha256_hex(d) for f, d in files.items()}}  # fmt: skip
        storage.put_bytes(layout.model_file_key(run_key, name, "model_card.json"), json.dumps(card).encode())
    storage.put_bytes(layout.results_key(run_key), b"{}")


@pytest.fixture(scope="module")
def store_once(tmp_path_factory) -> Path:
    """Two finished runs' models, exported once for the module: the storage's folder."""
    storage = LocalStorage(tmp_path_factory.mktemp("scoring") / "store")
    write_run(storage, "old", {"cnn": (32, 0.9)})
    time.sleep(0.01)
    write_run(storage, "new", {"cnn": (32, 0.7), "mobilenetv2": (40, 0.8)})
    os.utime(storage.local_path(layout.results_key("old")), (1, 1))  # "new" finished last
    return storage.root


@pytest.fixture
def store(store_once, tmp_path) -> LocalStorage:
    """A copy of the two runs for this test (timestamps kept: "new" still finished last)."""
    shutil.copytree(store_once, tmp_path / "store")
    return LocalStorage(tmp_path / "store")


def _scoring_objects(storage) -> list[str]:
    return sorted(storage.list("scoring/"))


# --- the model ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_best_model_of_the_latest_finished_run_is_chosen_on_validation(store):
    chosen = scoring.choose_model(store)
    assert (chosen["run_key"], chosen["model"], chosen["val_accuracy"]) == ("new", "mobilenetv2", 0.8)
    card = json.loads(store.get_bytes(layout.model_file_key("new", "mobilenetv2", "model_card.json")))
    assert chosen["model_sha256"] == card["files"]["model.pt2"]
    assert scoring.choose_model(store, "old")["model"] == "cnn"
    assert scoring.choose_model(store, "new", "cnn")["val_accuracy"] == 0.7
    with pytest.raises(scoring.ScoringError, match="run new has no model 'resnet50': it has cnn, mobilenetv2"):
        scoring.choose_model(store, "new", "resnet50")
    with pytest.raises(scoring.ScoringError, match="run nope has no trained model"):
        scoring.choose_model(store, "nope")
    with pytest.raises(scoring.ScoringError, match="holds no finished training run"):
        scoring.choose_model(LocalStorage(store.root.parent / "empty"))


def _cards_only(storage, run_key: str, val: dict[str, float], warnings: list[dict] | bytes) -> None:
    """A finished run as far as choosing a model reads it: each model's card (its checksums, its validation
    accuracy) and results.json with the report's health findings. Nothing exported: a unit test."""
    for name, accuracy in val.items():
        card = {"model": name, "val_accuracy": accuracy, "files": {"model.pt2": sha256_hex(name.encode())}}
        storage.put_bytes(layout.model_file_key(run_key, name, "model_card.json"), json.dumps(card).encode())
    body = warnings if isinstance(warnings, bytes) else json.dumps({"warnings": warnings}).encode()
    storage.put_bytes(layout.results_key(run_key), body)


def _finding(model: str, check: str, repeat: int = 0) -> dict:
    return {"model": model, "repeat": repeat, "check": check, "detail": "...", "numbers": {}}


def test_the_best_model_is_never_one_the_report_flagged(tmp_path, caplog):
    """A collapsed model can top validation accuracy (a one-class model on a skewed split): "best" passes
    over what the run's report flagged; a flagged model named outright is scored, with a warning."""
    storage = LocalStorage(tmp_path / "store")
    _cards_only(storage, "r", {"cnn": 0.9, "mobilenetv2": 0.8, "resnet50": 0.7},
                [_finding("cnn", "one_class"), _finding("cnn", "not_above_majority"),
                 _finding("mobilenetv2", "one_class", repeat=1)])  # fmt: skip
    with caplog.at_level("INFO", logger="gender_tasks.scoring"):
        chosen = scoring.choose_model(storage, "r")
    # cnn is flagged in the run's own models (repeat 0); mobilenetv2 only in a later repeat's, not stored here.
    assert (chosen["model"], chosen["val_accuracy"], chosen["flagged"]) == ("mobilenetv2", 0.8, [])
    assert "left out, flagged by the report: cnn: one_class, not_above_majority" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="gender_tasks.scoring"):
        named = scoring.choose_model(storage, "r", "cnn")
    assert named["model"] == "cnn" and named["flagged"] == ["one_class", "not_above_majority"]
    assert "scoring with cnn of run r as asked, though its report flagged it" in caplog.text


def test_a_run_whose_every_model_is_flagged_has_no_best_model(tmp_path):
    storage = LocalStorage(tmp_path / "store")
    _cards_only(storage, "r", {"cnn": 0.5, "ensemble": 0.5},
                [_finding("cnn", "one_class"), _finding("ensemble", "not_above_majority")])  # fmt: skip
    with pytest.raises(scoring.ScoringError, match=r"every model of run r was flagged by its report \(cnn: one_class; "
                                                   r"ensemble: not_above_majority\).*name a model"):  # fmt: skip
        scoring.choose_model(storage, "r")
    _cards_only(storage, "bad", {"cnn": 0.9}, b"{not json")
    with pytest.raises(scoring.ScoringError, match=r"runs/bad/results\.json is not readable JSON .* Run its report"):
        scoring.choose_model(storage, "bad")


def test_the_summary_says_a_named_model_was_flagged():
    report = {"model": {"run_key": "r", "model": "cnn", "val_accuracy": 0.5, "model_sha256": "ab", "flagged": ["one_class"]},
              "source": "/faces", "images": 2, "scored": 2, "failed": 0, "counts": {"female": 2},
              "class_shares": {"female": 1.0},
              "confidence_histogram": {"edges": [0.5, 0.75, 1.0], "counts": [0, 2]}, "least_sure": [],
              "training_images": None, "training_error": "none", "drift": [], "drift_threshold_psi": 0.25,
              "generated_at": "2026-12-04T00:00:00Z"}  # fmt: skip
    page = scoring.render_summary(report)
    assert 'id="flagged"' in page and "Its report flagged this model (one_class)" in page
    report["model"]["flagged"] = []
    assert 'id="flagged"' not in scoring.render_summary(report)


# --- scoring ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_folder_is_scored_with_predictions_and_a_summary_and_rescoring_it_does_nothing(store, tmp_path,
                                                                                         monkeypatch):  # fmt: skip
    images = _flat(tmp_path / "new-images", 10)
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")  # decodes to an error row, the rest are scored
    out = scoring.score_images(str(images), str(store.root), batch_size=4)
    assert out["unchanged"] is False and out["images"] == 11 and out["scored"] == 10 and out["failed"] == 1
    assert (out["run_key"], out["model"]) == ("new", "mobilenetv2")
    prefix = layout.score_prefix(out["score_key"])
    table = pd.read_csv(io.BytesIO(store.get_bytes(f"{prefix}/predictions.csv")), keep_default_na=False)
    assert list(table.columns) == scoring.COLUMNS and len(table) == 11
    assert sorted(table["file"]) == sorted(p.name for p in images.iterdir())
    ok = table[table["error"] == ""]
    assert ok["prob_male"].astype(float).between(0, 1).all() and set(ok["predicted"]) <= {"female", "male"}
    assert (ok["model"] == "mobilenetv2").all() and (ok["model_sha256"] == out["model_sha256"]).all()
    assert table.set_index("file").loc["broken.jpg", "error"] != ""
    assert table.set_index("file").loc["img_000.jpg", "sha256"] == sha256_hex((images / "img_000.jpg").read_bytes())

    # The probabilities are the exported model's on decode_resize at its input size, as `predict` computes them.
    from gender_tasks.data.images import decode_resize
    from gender_tasks.evaluation.predict import input_batches, load_stored_model

    module, meta = load_stored_model(store, layout.model_prefix("new", "mobilenetv2"))
    names = list(ok["file"])
    expected = module(*input_batches([[decode_resize((images / n).read_bytes(), 40) for n in names]])).detach()
    np.testing.assert_allclose(ok["prob_male"].astype(float), expected.numpy(), atol=1e-6)

    summary = json.loads(store.get_bytes(f"{prefix}/summary.json"))
    assert sum(summary["counts"].values()) == 10 and sum(summary["class_shares"].values()) == pytest.approx(1)
    assert sum(summary["confidence_histogram"]["counts"]) == 10
    assert len(summary["least_sure"]) == 10
    margins = [abs(r["prob_male"] - 0.5) for r in summary["least_sure"]]
    assert margins == sorted(margins) and all(r["thumbnail"].startswith("data:image/jpeg;base64,")
                                              for r in summary["least_sure"])  # fmt: skip
    assert summary["training_images"] == 6 and {d["statistic"] for d in summary["drift"]} == set(scoring.STATS)
    assert all(d["psi"] >= 0 and isinstance(d["differs"], bool) for d in summary["drift"])
    page = store.get_bytes(f"{prefix}/summary.html").decode()
    for section in ('id="class-shares"', 'id="confidence"', 'id="least-sure"', 'id="drift"', "mobilenetv2"):
        assert section in page, section
    assert "<script" not in page

    # Again, unchanged: no model loaded, nothing decoded, nothing written.
    before = {k: store.local_path(k).stat().st_mtime_ns for k in store.list("scoring/")}
    monkeypatch.setattr("gender_tasks.evaluation.predict.load_stored_model", lambda *a: pytest.fail("loaded"))
    monkeypatch.setattr(scoring, "_score_batch", lambda *a: pytest.fail("scored"))
    again = scoring.score_images(str(images), str(store.root), batch_size=4)
    assert again["unchanged"] is True and again["score_key"] == out["score_key"]
    assert {k: store.local_path(k).stat().st_mtime_ns for k in store.list("scoring/")} == before

    # Predictions edited in storage: `verify --repair` removes them with the summary.json that marks the scoring
    # done, and scoring the images again assembles them from the stored parts (still no model loaded).
    from gender_tasks.verify import verify_storage

    original = store.get_bytes(f"{prefix}/predictions.csv")
    store.put_bytes(f"{prefix}/predictions.csv", original + b"forged.jpg" + b"," * (len(scoring.COLUMNS) - 1) + b"\n")
    report = verify_storage(store, repair=True)
    assert [f.key for f in report.corrupt] == [f"{prefix}/predictions.csv"]
    assert not store.exists(f"{prefix}/summary.json")
    rebuilt = scoring.score_images(str(images), str(store.root), batch_size=4)
    assert rebuilt["unchanged"] is False and rebuilt["reused_batches"] == 3
    assert store.get_bytes(f"{prefix}/predictions.csv") == original and store.exists(f"{prefix}/summary.json")


@pytest.mark.slow
def test_a_killed_scoring_resumes_after_its_last_finished_batch(store, tmp_path, monkeypatch):
    images = _flat(tmp_path / "imgs", 10)
    real, calls = scoring._score_batch, []

    def dies_on_the_third(*args):
        calls.append(len(args[2]))
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed
        return real(*args)

    monkeypatch.setattr(scoring, "_score_batch", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        scoring.score_images(str(images), str(store.root), batch_size=3)
    assert not [k for k in store.list("scoring/") if k.endswith("summary.json")]
    calls.clear()
    out = scoring.score_images(str(images), str(store.root), batch_size=3)
    assert calls == [3, 1] and out["reused_batches"] == 2 and out["scored"] == 10  # only batches 3 and 4 ran
    # A changed image is new input: scored again, under another key.
    make_face("male", np.random.default_rng(99)).save(images / "img_009.jpg", "JPEG")
    calls.clear()
    changed = scoring.score_images(str(images), str(store.root), batch_size=3)
    assert changed["score_key"] != out["score_key"] and calls == [1] and changed["reused_batches"] == 3


@pytest.mark.parametrize("leases", ["held", "switched off"])
def test_gc_beside_a_scoring_removes_nothing_it_uses_and_the_old_scoring_after_it(store, tmp_path, monkeypatch,
                                                                                 leases):  # fmt: skip
    """A scoring reuses scored batches written 40 days ago, with the model of a run finished 40 days ago, while
    `gc --keep-days 0` runs before every stored object it reads: its leases keep the batches and the run. With the
    leases switched off gc takes the batches from under it: the check can fail. Afterwards gc removes it all."""
    import contextlib
    import types

    from gender_tasks.housekeeping import collect_garbage

    images = _flat(tmp_path / "imgs", 7)
    first = scoring.score_images(str(images), str(store.root), run="new", batch_size=3)
    for key in store.list(layout.score_prefix(first["score_key"]) + "/"):
        store.delete(key)  # its outputs gone: scoring the images again assembles them from the stored batches
    for key in store.list("scoring/") + store.list("runs/new/"):
        t = time.time() - 40 * 86_400
        os.utime(store.local_path(key), (t, t))
    if leases == "switched off":

        @contextlib.contextmanager
        def no_lease(storage, key, **kwargs):
            yield types.SimpleNamespace(renew=lambda: None, lapsed=False)

        monkeypatch.setattr(scoring, "hold_lease", no_lease)
    removed, read = [], scoring.get_recorded

    def collect_then_read(*args):
        removed.extend(collect_garbage(LocalStorage(store.root), keep_days=0))
        return read(*args)

    monkeypatch.setattr(scoring, "get_recorded", collect_then_read)
    if leases == "switched off":
        with pytest.raises(FileNotFoundError):
            scoring.score_images(str(images), str(store.root), run="new", batch_size=3)
        assert any(r.reason.startswith("scored batch 40 days old") for r in removed)
        return
    again = scoring.score_images(str(images), str(store.root), run="new", batch_size=3)
    assert again["score_key"] == first["score_key"] and again["reused_batches"] == 3 and again["scored"] == 7
    gone = {r.key for r in removed}
    assert not [k for k in gone if k.startswith(("scoring/", "runs/new/"))]
    assert [k for k in gone if k.startswith("runs/old/")]  # the run it does not use is old: gc did run
    assert not store.list("scoring/leases/") and not store.list("runs/new/leases/")  # released
    # Finished, and two days later: the scoring, its batches (40 days old) and its run go.
    monkeypatch.setattr(scoring, "get_recorded", read)
    before = set(store.list("scoring/")) | set(store.list("runs/new/"))
    later = {r.key for r in collect_garbage(store, keep_days=0, now=time.time() + 2 * 86_400)}
    assert before and later >= before and store.list("scoring/") == [] and store.list("runs/new/") == []


@pytest.mark.slow
def test_a_zip_is_scored_naming_its_entries(store, tmp_path):
    images = _flat(tmp_path / "imgs", 4)
    archive = tmp_path / "new.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(images.iterdir()):
            zf.write(p, f"batch1/{p.name}")
    out = scoring.score_images(str(archive), str(store.root), run="old", model="cnn")
    table = pd.read_csv(io.BytesIO(store.get_bytes(f"{layout.score_prefix(out['score_key'])}/predictions.csv")))
    assert sorted(table["file"]) == [f"batch1/img_{i:03d}.jpg" for i in range(4)]
    assert (table["model"] == "cnn").all() and (table["run_key"] == "old").all()


@pytest.mark.slow
def test_an_s3_prefix_is_scored(store, tmp_path, s3_bucket, s3_env):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_env)
    for p in sorted(_flat(tmp_path / "imgs", 3).iterdir()):
        client.put_object(Bucket=s3_bucket, Key=f"incoming/{p.name}", Body=p.read_bytes())
    out = scoring.score_images(f"s3://{s3_bucket}/incoming", str(store.root))
    assert out["images"] == 3 and out["scored"] == 3


# --- hostile input: refused, named, nothing written ------------------------------------------------------------


def _fifo(folder: Path, tmp: Path) -> tuple[str, str]:
    os.mkfifo(folder / "pipe.jpg")
    return str(folder), "pipe.jpg is a FIFO (named pipe), not a regular file"


def _link_out(folder: Path, tmp: Path) -> tuple[str, str]:
    (tmp / "secret.jpg").write_bytes(b"x")
    (folder / "link.jpg").symlink_to(tmp / "secret.jpg")
    return str(folder), "link.jpg is a symbolic link to"


def _bad_name(folder: Path, tmp: Path) -> tuple[str, str]:
    shutil.copy(folder / "img_000.jpg", folder / "evil\u202egpj.jpg")
    return str(folder), "bidirectional-text control"


def _too_large(folder: Path, tmp: Path) -> tuple[str, str]:
    (folder / "huge.jpg").write_bytes(b"\xff" * 2_000_001)
    return str(folder), "huge.jpg is 2.0 MB, over the"


def _not_an_image(folder: Path, tmp: Path) -> tuple[str, str]:
    (folder / "notes.txt").write_text("hello")
    return str(folder), "notes.txt is not an image"


def _empty(folder: Path, tmp: Path) -> tuple[str, str]:
    empty = tmp / "empty"
    (empty / "sub").mkdir(parents=True)
    return str(empty), "holds no images"


def _zip_slip(folder: Path, tmp: Path) -> tuple[str, str]:
    with zipfile.ZipFile(tmp / "evil.zip", "w") as zf:
        zf.writestr("ok.jpg", (folder / "img_000.jpg").read_bytes())
        zf.writestr("../../../../tmp/evil.jpg", b"x")
    return str(tmp / "evil.zip"), "would be written outside the target folder"


def _missing(folder: Path, tmp: Path) -> tuple[str, str]:
    return str(tmp / "nowhere"), "nowhere' do not exist"


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("make", [_fifo, _link_out, _bad_name, _too_large, _not_an_image, _empty, _zip_slip, _missing],
                         ids=lambda f: f.__name__.strip("_"))  # fmt: skip
def test_hostile_input_is_refused_named_with_nothing_written(store, tmp_path, make):
    folder = _flat(tmp_path / "imgs", 3)
    source, named = make(folder, tmp_path)
    with pytest.raises(PermanentError) as err:
        scoring.score_images(source, str(store.root), max_file_bytes=2_000_000)
    message = str(err.value)
    assert named in message, message
    assert "gender-score-" not in message and "gender-src-" not in message  # no temporary paths
    assert _scoring_objects(store) == []


# --- the DAG's inputs, the DAG and the plugin --------------------------------------------------------------


def test_a_run_triggered_by_published_models_scores_with_that_runs_model():
    params = {"source": "/data/new", "storage": None, "run": "latest", "model": "best", "batch_size": 64}
    events = [{"run_key": "manual__2026", "storage": "s3://bucket/p"}]
    request = scoring.request_from(params, events, manual=False)
    assert request == {"source": "/data/new", "storage_uri": "s3://bucket/p", "run": "manual__2026",
                       "model": "best", "batch_size": 64}  # fmt: skip
    assert scoring.request_from({**params, "run": "r1"}, events, manual=False)["run"] == "r1"  # named: kept
    assert "skipped" in scoring.request_from({**params, "source": ""}, events, manual=False)
    with pytest.raises(scoring.ScoringError, match="no images to score"):
        scoring.request_from({**params, "source": " "}, [], manual=True)


@pytest.mark.slow
def test_the_scoring_dag_is_scheduled_on_the_asset_the_training_report_emits():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    training, scoring_dag = bag.dags["gender_classification"], bag.dags["gender_scoring"]
    [emitted] = training.get_task("report").outlets
    assert emitted.name == "gender_classification_models"
    assert list(scoring_dag.timetable.asset_condition.objects) == [emitted]
    assert all(t.retries >= 1 and t.execution_timeout for t in scoring_dag.tasks)
    # With GENDER_SCORING_SCHEDULE also on a cron.
    probe = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('d', sys.argv[1]); "
             "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); t = m.gender_scoring().timetable; "
             "print(type(t).__name__, t.timetable.expression, [a.name for a in t.asset_condition.objects])")  # fmt: skip
    import subprocess
    import sys

    env = {**os.environ, "GENDER_SCORING_SCHEDULE": "0 6 * * *"}
    done = subprocess.run([sys.executable, "-c", probe, str(REPO / "dags" / "gender_scoring.py")], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[-2] == "AssetOrTimeSchedule 0 6 * * * ['gender_classification_models']"


def _plugin():
    spec = importlib.util.spec_from_file_location("gender_scoring_view", REPO / "plugins" / "gender_scoring_view.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_plugin_shows_a_runs_summary_and_lists_runs(store, tmp_path):
    out = scoring.score_images(str(_flat(tmp_path / "imgs", 3)), str(store.root))
    plugin = _plugin()
    status, page = plugin.summary_page("r1", "success", out)
    assert status == 200 and page == store.get_bytes(f"scoring/{out['score_key']}/summary.html").decode()
    assert plugin.summary_page("r2", None, None)[0] == 404
    status, page = plugin.summary_page("r3", "running", None)
    assert status == 200 and "appears when the score task has finished" in page
    status, page = plugin.summary_page("r4", "success", {**out, "score_key": "../../etc/passwd"})
    assert "No summary yet" in page  # a key that is not a score key is never read
    store.put_bytes(f"scoring/{out['score_key']}/summary.html", b"<p>edited in storage</p>")
    status, page = plugin.summary_page("r1", "success", out)  # the page is checked like any stored object
    assert status == 500 and "Summary damaged" in page and "edited in storage" not in page
    assert "summary.html is corrupt" in page and "verify --storage" in page and "--repair" in page
    for key in store.list(f"scoring/{out['score_key']}/"):
        store.delete(key)  # as gc removes an old scoring
    status, page = plugin.summary_page("r1", "success", out)
    assert status == 404 and "Summary missing" in page and "<code>gc</code> removes scorings older" in page
    listing = plugin.index_page([("r1", "success", out), ("r<b>", "failed", None)])
    assert "/gender-scoring/runs/r1" in listing and "mobilenetv2 of new" in listing and "r&lt;b&gt;" in listing


@pytest.mark.slow
def test_the_scoring_dag_runs_end_to_end_and_is_queued_by_the_model_asset(airflow_db, tmp_path):
    from airflow.assets.manager import AssetManager
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.asset import AssetDagRunQueue, AssetModel
    from airflow.models.dag import DagModel
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState
    from sqlalchemy import select

    storage = LocalStorage(tmp_path / "store")
    write_run(storage, "trained", {"cnn": (32, 0.75)})
    images = _flat(tmp_path / "imgs", 5)
    dag = DagBag(dag_folder=str(REPO / "dags")).dags["gender_scoring"]
    run = dag.test(run_conf={"source": str(images), "storage": str(storage.root)})
    assert run.state == DagRunState.SUCCESS
    [key] = {k.split("/")[1] for k in storage.list("scoring/") if k.endswith("/summary.json")}
    summary = json.loads(storage.get_bytes(f"scoring/{key}/summary.json"))
    assert summary["images"] == 5 and summary["model"]["run_key"] == "trained"

    # The training DAG's report publishes the models: the event queues a gender_scoring run.
    with create_session() as session:
        asset = session.scalar(select(AssetModel).where(AssetModel.name == "gender_classification_models"))
        assert asset is not None  # registered by the scoring DAG's schedule
        DagModel.get_dagmodel("gender_scoring", session=session).is_paused = False  # as once switched on
        session.flush()
        AssetManager.register_asset_change(asset=asset, extra={"run_key": "trained", "storage": str(storage.root)},
                                           session=session)  # fmt: skip
        session.flush()
        queued = session.scalars(select(AssetDagRunQueue.target_dag_id)).all()
        assert "gender_scoring" in queued
        due, _ = DagModel.dags_needing_dagruns(session)
        assert "gender_scoring" in {d.dag_id for d in due}
        session.rollback()
    assert open_storage(str(storage.root)).exists(f"scoring/{key}/predictions.csv")


@pytest.mark.slow
def test_the_score_command_prints_where_the_results_are_and_refuses_bad_input_in_one_line(store, tmp_path, capsys):
    from gender_tasks.cli import main

    images = _flat(tmp_path / "imgs", 3)
    assert main(["score", "--images", str(images), "--storage", str(store.root), "--model", "cnn"]) == 0
    out = capsys.readouterr().out
    assert "scored 3 images with cnn of run new" in out and "/summary.html" in out and "/predictions.csv" in out
    assert main(["score", "--images", str(images), "--storage", str(store.root), "--model", "cnn"]) == 0
    assert "already scored (unchanged images, same model)" in capsys.readouterr().out
    os.mkfifo(images / "pipe.jpg")
    assert main(["score", "--images", str(images), "--storage", str(store.root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "pipe.jpg is a FIFO" in err[0]
