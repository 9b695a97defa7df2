import json

import pandas as pd
import pytest
from helpers import copy_prepared, write_dataset

from gender_tasks import pipeline
from gender_tasks.evaluation.predict import predict_folder
from gender_tasks.integrity import sha256_hex
from gender_tasks.layout import model_prefix, trained_prefix
from gender_tasks.models.registry import ProfilePlan
from gender_tasks.settings import Settings
from gender_tasks.storage import open_storage
from gender_tasks.training import trainer
from gender_tasks.training.trainer import train_model

pytestmark = pytest.mark.slow  # every test trains a model


@pytest.fixture(scope="module")
def prepared_once(tmp_path_factory):
    """Ingested, split, validated and preprocessed once for the module: (its folder, the run record)."""
    base = tmp_path_factory.mktemp("prepared")
    src = write_dataset(base / "faces", 20)
    run = pipeline.prepare({"source": str(src), "storage": str(base / "store"), "profile": "tiny",
                            "models": ["cnn", "mobilenetv2"], "min_rows": 10})  # fmt: skip
    return base, pipeline.preprocess(pipeline.validate(pipeline.split(pipeline.ingest(run))))


@pytest.fixture
def prepared(prepared_once, tmp_path):
    """The prepared run, copied for this test: a model another test trained would otherwise be reused."""
    return copy_prepared(*prepared_once, tmp_path / "prepared")


def _manifest(settings, split_info):
    from gender_tasks.data.manifest import read_manifest

    return read_manifest(open_storage(settings["storage"]), split_info["split_key"])


def test_training_writes_every_output_and_removes_its_checkpoint(prepared):
    dataset = prepared["dataset"]
    out = pipeline.train(prepared, "cnn")
    storage = open_storage(prepared["storage"])
    prefix = model_prefix(prepared["run_key"], "cnn")
    keyed = trained_prefix(dataset["dataset_id"], "cnn", out["train_key"])
    for name in ("metrics.json", "history.json", "predictions.csv", "model.pt2", "model_card.json"):
        assert storage.exists(f"{prefix}/{name}"), name
        assert storage.get_bytes(f"{prefix}/{name}") == storage.get_bytes(f"{keyed}/{name}"), name
    metrics = json.loads(storage.get_bytes(f"{prefix}/metrics.json"))
    assert 0 <= metrics["test"]["accuracy"] <= 1 and metrics["epochs"] == 2
    assert out["seconds"] > 0 and out["reused"] is False
    record = json.loads(storage.get_bytes(f"{prefix}/trained.json"))
    assert record["trained"] == keyed and record["inputs"]["dataset_id"] == dataset["dataset_id"]
    # Exported: no checkpoint is left, neither keyed nor in the run.
    assert [k for k in storage.list("") if k.endswith("checkpoint.pt")] == []


def test_a_second_run_with_the_same_inputs_reuses_the_model_and_a_changed_setting_retrains(prepared, caplog):
    run, settings = prepared, prepared["settings"]
    first = pipeline.train({**run, "run_key": "ra"}, "cnn")
    caplog.set_level("INFO")
    # Settings that do not change training (the source's spelling, checks, other models) keep the key.
    same = {**settings, "source": settings["source"] + "/", "min_rows": 5, "models": ["cnn"]}
    second = pipeline.train({**run, "settings": same, "run_key": "rb"}, "cnn")
    assert second["reused"] is True and second["train_key"] == first["train_key"]
    assert "cnn: reusing the model trained with the same inputs" in caplog.text
    assert "cnn epoch 1/2" not in caplog.text  # nothing was trained
    storage = open_storage(settings["storage"])
    assert storage.exists(f"{model_prefix('rb', 'cnn')}/model.pt2")
    caplog.clear()
    changed = pipeline.train({**run, "settings": {**settings, "learning_rate": 5e-4}, "run_key": "rc"}, "cnn")
    assert changed["reused"] is False and changed["train_key"] != first["train_key"]
    assert "cnn epoch 1/2" in caplog.text


def test_a_stored_model_that_lost_a_file_is_trained_again_not_reused(prepared, caplog):
    # Its card is there but a file went since (deleted, a lifecycle rule, a repair stopped before the card):
    # reused, the run would fail copying it, retry after retry. The next run trains it again instead.
    first = pipeline.train({**prepared, "run_key": "ra"}, "cnn")
    storage = open_storage(prepared["storage"])
    keyed = trained_prefix(prepared["dataset"]["dataset_id"], "cnn", first["train_key"])
    storage.delete(f"{keyed}/predictions.csv")
    caplog.set_level("INFO")
    second = pipeline.train({**prepared, "run_key": "rb"}, "cnn")
    assert second["reused"] is False and second["train_key"] == first["train_key"]
    assert f"cnn: the model under {storage.url(keyed)} lacks predictions.csv" in caplog.text
    assert "cnn epoch 1/2" in caplog.text and storage.exists(f"{model_prefix('rb', 'cnn')}/predictions.csv")
    assert storage.exists(f"{keyed}/predictions.csv")  # the keyed model is whole again, for the runs after


class _Killed(Exception):
    pass


def test_resume_continues_after_the_last_checkpoint(prepared, caplog, monkeypatch):
    settings, dataset, split_info = prepared["settings"], prepared["dataset"], prepared["split"]
    storage = open_storage(settings["storage"])
    manifest = _manifest(settings, split_info)
    settings = Settings.from_dict(settings)
    settings = settings.replace(per_model={**settings.per_model, "mobilenetv2": ProfilePlan(32, 3, 1)})
    kwargs = dict(model_name="mobilenetv2", manifest=manifest, dataset_id=dataset["dataset_id"],
                  settings=settings)  # fmt: skip
    monkeypatch.setenv(trainer.CHECKPOINT_EVERY_VAR, "0")  # a checkpoint after every epoch
    save = trainer.save_checkpoint

    def save_then_die(*args, epoch, **kw):  # the process is killed right after epoch 1's checkpoint
        save(*args, epoch=epoch, **kw)
        raise _Killed

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        train_model(storage, run_key="r2-killed", **kwargs)
    monkeypatch.setattr(trainer, "save_checkpoint", save)
    caplog.set_level("INFO")
    train_model(storage, run_key="r2", **kwargs)  # a new run: the checkpoint is keyed by inputs, not by run
    assert "mobilenetv2: resuming at epoch 2/3 (checkpoint of epoch 1)" in caplog.text
    assert "mobilenetv2 epoch 1/3" not in caplog.text  # epoch 1 was not trained again
    history = json.loads(storage.get_bytes(f"{model_prefix('r2', 'mobilenetv2')}/history.json"))
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert [h["frozen"] for h in history] == [True, False, False]
    # After the last epoch the BatchNorm statistics were recomputed for the final weights (loop.
    # recalibrate_batchnorm): the last validation numbers, and metrics.json's, are the exported model's.
    prefix = model_prefix("r2", "mobilenetv2")
    assert history[-1]["batchnorm_recalibrated_on"] == len(manifest[manifest["split"] == "train"])
    assert "val_accuracy_before_recalibration" in history[-1]
    preds = pd.read_csv(storage.local_path(f"{prefix}/predictions.csv"))
    val = preds[preds["split"] == "val"]
    metrics = json.loads(storage.get_bytes(f"{prefix}/metrics.json"))
    assert metrics["val_accuracy"] == history[-1]["val_accuracy"] == pytest.approx((val.label == val.predicted).mean())


@pytest.mark.parametrize(("model", "val_passes"), [("mobilenetv2", 3), ("cnn", 2)])
def test_each_split_is_predicted_once_with_the_final_weights(prepared, monkeypatch, model, val_passes):
    """Validation is scored after every epoch and, for a model with BatchNorm, once more after the
    recalibration; the predictions written are those last figures, not a second pass over the same images.
    (The CNN has no BatchNorm: its last epoch's pass is the final model's.)"""
    settings, manifest = prepared["settings"], _manifest(prepared["settings"], prepared["split"])
    split_of = dict(zip(manifest["key"], manifest["split"], strict=True))
    calls, real = [], trainer.predict_proba

    def counting(model, data, *args, **kwargs):
        calls.append(split_of[data.keys[0]])
        return real(model, data, *args, **kwargs)

    monkeypatch.setattr(trainer, "predict_proba", counting)
    s = Settings.from_dict(settings)
    s = s.replace(per_model={**s.per_model, model: ProfilePlan(32, 2, 1 if model == "mobilenetv2" else 0)})
    storage = open_storage(settings["storage"])
    train_model(storage, run_key="r-once", model_name=model, manifest=manifest,
                dataset_id=prepared["dataset"]["dataset_id"], settings=s)  # fmt: skip
    # 2 epochs (+ the recalibrated model where there is BatchNorm), then train and test once each.
    assert sorted(calls) == sorted(["val"] * val_passes + ["train", "test"])
    prefix = model_prefix("r-once", model)
    history = json.loads(storage.get_bytes(f"{prefix}/history.json"))
    preds = pd.read_csv(storage.local_path(f"{prefix}/predictions.csv"))
    val = preds[preds["split"] == "val"]
    assert ("batchnorm_recalibrated_on" in history[-1]) == (model == "mobilenetv2")
    assert history[-1]["val_accuracy"] == pytest.approx((val.label == val.predicted).mean())


def test_predict_classifies_a_folder_with_an_exported_model(prepared, tmp_path):
    run = {**prepared, "run_key": "r3"}
    pipeline.train(run, "cnn")
    storage = open_storage(run["storage"])
    model_uri = storage.url(f"{model_prefix('r3', 'cnn')}/model.pt2")
    images = write_dataset(tmp_path / "new", 4, seed=9)
    n = predict_folder(model_uri, images, tmp_path / "pred.csv")
    table = pd.read_csv(tmp_path / "pred.csv")
    assert n == 8 and len(table) == 8
    assert set(table["predicted"]) <= {"female", "male"}
    assert table["prob_male"].between(0, 1).all()


@pytest.mark.parametrize(("every_s", "saved"), [("0", [0, 1, 2]), ("", [2]), ("1e9", [2])])
def test_checkpoints_are_written_when_due_and_after_the_last_epoch(prepared, monkeypatch, caplog, every_s, saved):
    """GENDER_CHECKPOINT_EVERY_S: 0 writes one after every epoch; the default (60 s) and longer ones, on epochs
    of a second, only after the last. Killed while exporting, a run resumes from that one and trains nothing."""
    storage = open_storage(prepared["storage"])
    settings = Settings.from_dict(prepared["settings"])
    settings = settings.replace(per_model={**settings.per_model, "mobilenetv2": ProfilePlan(32, 3, 1)})
    kwargs = dict(model_name="mobilenetv2", manifest=_manifest(prepared["settings"], prepared["split"]),
                  dataset_id=prepared["dataset"]["dataset_id"], settings=settings)  # fmt: skip
    monkeypatch.setenv(trainer.CHECKPOINT_EVERY_VAR, every_s)
    epochs, save, export = [], trainer.save_checkpoint, trainer.export_model

    def counted(*args, epoch, **kw):
        epochs.append(epoch)
        save(*args, epoch=epoch, **kw)

    def killed(*args, **kw):
        raise _Killed

    monkeypatch.setattr(trainer, "save_checkpoint", counted)
    monkeypatch.setattr(trainer, "export_model", killed)
    with pytest.raises(_Killed):
        train_model(storage, run_key="killed", **kwargs)
    assert epochs == saved
    monkeypatch.setattr(trainer, "export_model", export)
    caplog.set_level("INFO")
    assert train_model(storage, run_key="again", **kwargs)["reused"] is False
    assert "mobilenetv2: all 3 epochs were trained before; exporting from the checkpoint" in caplog.text
    assert "mobilenetv2 epoch" not in caplog.text and epochs == saved  # no epoch trained, no checkpoint written


def test_a_resumed_run_takes_the_same_learning_rates_as_an_uninterrupted_one(prepared, monkeypatch):
    """The schedule's state rides in the checkpoint: killed after epoch 1 and resumed, the per-step
    warm-up/cosine rates (and the unfreeze's new optimizer) continue where they were."""
    storage = open_storage(prepared["storage"])
    settings = Settings.from_dict(prepared["settings"])
    assert settings.recipe.schedule == "warmup_cosine"
    settings = settings.replace(per_model={**settings.per_model, "mobilenetv2": ProfilePlan(32, 3, 1)})
    kwargs = dict(model_name="mobilenetv2", manifest=_manifest(prepared["settings"], prepared["split"]),
                  dataset_id=prepared["dataset"]["dataset_id"])  # fmt: skip
    # Another seed (initialisation and order only: the same steps, so the same rates) keys another model.
    train_model(storage, run_key="whole", settings=settings.replace(seed=settings.seed + 1), **kwargs)
    monkeypatch.setenv(trainer.CHECKPOINT_EVERY_VAR, "0")  # a checkpoint after every epoch
    save = trainer.save_checkpoint

    def save_then_die(*args, epoch, **kw):
        save(*args, epoch=epoch, **kw)
        raise _Killed

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        train_model(storage, run_key="resumed", settings=settings, **kwargs)
    monkeypatch.setattr(trainer, "save_checkpoint", save)
    assert train_model(storage, run_key="resumed", settings=settings, **kwargs)["reused"] is False

    def rates(run_key):
        history = json.loads(storage.get_bytes(f"{model_prefix(run_key, 'mobilenetv2')}/history.json"))
        return [h["learning_rate"] for h in history]

    assert rates("resumed") == pytest.approx(rates("whole"))
    assert rates("whole")[-1] == pytest.approx(0.0, abs=1e-12)  # the cosine ends at 0


def test_the_ensemble_is_evaluated_and_its_export_loads_with_predict(prepared, tmp_path, caplog):
    from gender_tasks.cli import main

    run = {**prepared, "run_key": "r4"}
    for model in ("cnn", "mobilenetv2"):
        pipeline.train(run, model)
    out = pipeline.ensemble(run)
    assert out["repeats"][0]["model"] == "ensemble"
    storage = open_storage(run["storage"])
    prefix = model_prefix("r4", "ensemble")
    metrics = json.loads(storage.get_bytes(f"{prefix}/metrics.json"))
    # The members are chosen on validation (health checks, then greedy selection): one or both models.
    assert metrics["members"] and set(metrics["members"]) <= {"cnn", "mobilenetv2"}
    assert 0 <= metrics["test"]["accuracy"] <= 1
    preds = pd.read_csv(storage.local_path(f"{prefix}/predictions.csv"))
    members = [pd.read_csv(storage.local_path(f"{model_prefix('r4', m)}/predictions.csv")).set_index("key")["prob_male"]
               for m in metrics["members"]]  # fmt: skip
    mean = pd.concat(members, axis=1).mean(axis=1)
    assert preds.set_index("key")["prob_male"].to_numpy() == pytest.approx(mean.loc[preds["key"]].to_numpy())

    # Written last, its card records the sha256 of each of its files: `predict` verifies the export.
    card = json.loads(storage.get_bytes(f"{prefix}/model_card.json"))
    assert card["members"] == metrics["members"]
    for name in ("predictions.csv", "metrics.json", "model.pt2"):
        assert card["files"][name] == sha256_hex(storage.get_bytes(f"{prefix}/{name}")), name

    images = write_dataset(tmp_path / "new", 3, seed=5)
    model_ts = storage.url(f"{prefix}/model.pt2")
    caplog.set_level("WARNING")
    assert main(["predict", "--model", model_ts, "--images", str(images), "--out", str(tmp_path / "e.csv")]) == 0
    assert "cannot be verified" not in caplog.text
    table = pd.read_csv(tmp_path / "e.csv")
    assert len(table) == 6 and table["prob_male"].between(0, 1).all() and set(table["predicted"]) <= {"female", "male"}


def test_a_running_epoch_logs_its_progress(caplog):
    from gender_tasks.training.loop import progress_logger

    caplog.set_level("INFO", logger="gender_tasks.training.loop")
    report = progress_logger("cnn epoch 1/12", every_s=0)
    report(1024, 8000)
    report(8000, 8000)  # the epoch's own summary line follows; no "100%" progress line
    assert [r.getMessage() for r in caplog.records] == ["cnn epoch 1/12: 1,024/8,000 images (12%)"]
    quiet = progress_logger("cnn epoch 2/12", every_s=3600)
    quiet(16, 8000)
    assert len(caplog.records) == 1


def test_a_small_split_trains_the_plans_minimum_of_steps_and_says_so(prepared, caplog):
    """A plan's min_steps raises the epochs on a split too small for them (here 28 images, batch 16: 2 steps
    an epoch, so a 1-epoch plan with a minimum of 7 steps trains 4 epochs); the history, the metrics and
    the log say what was trained."""
    settings, dataset, split_info = prepared["settings"], prepared["dataset"], prepared["split"]
    storage = open_storage(settings["storage"])
    manifest = _manifest(settings, split_info)
    n_train = int((manifest["split"] == "train").sum())
    settings = Settings.from_dict(settings)
    assert (n_train, settings.batch_size) == (28, 16)
    settings = settings.replace(per_model={**settings.per_model, "cnn": ProfilePlan(32, 1, 0, min_steps=7)})
    caplog.set_level("INFO")
    train_model(storage, run_key="r-min", model_name="cnn", manifest=manifest, dataset_id=dataset["dataset_id"],
                settings=settings)  # fmt: skip
    assert "cnn: 28 training images make 2 optimizer steps an epoch; 4 epochs (not 1)" in caplog.text
    history = json.loads(storage.get_bytes(f"{model_prefix('r-min', 'cnn')}/history.json"))
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert json.loads(storage.get_bytes(f"{model_prefix('r-min', 'cnn')}/metrics.json"))["epochs"] == 4
