import json

import pandas as pd
import pytest
from conftest import write_dataset

from gender_tasks import pipeline
from gender_tasks.evaluation.predict import predict_folder
from gender_tasks.layout import model_prefix
from gender_tasks.settings import Settings, TrainPlan
from gender_tasks.storage import open_storage
from gender_tasks.training import trainer
from gender_tasks.training.trainer import train_model


@pytest.fixture
def prepared(tmp_path):
    src = write_dataset(tmp_path / "faces", 20)
    settings = pipeline.prepare({"source": str(src), "storage": str(tmp_path / "store"), "profile": "tiny",
                                 "models": ["cnn", "mobilenetv2"], "min_rows": 10})  # fmt: skip
    dataset = pipeline.ingest(settings)
    split_info = pipeline.split(settings, dataset)
    pipeline.validate(settings, split_info)
    pipeline.preprocess(settings, dataset, split_info)
    return settings, dataset, split_info


def _manifest(settings, split_info):
    from gender_tasks.data.manifest import read_manifest

    return read_manifest(open_storage(settings["storage"]), split_info["split_key"])


def test_training_writes_every_output(prepared):
    settings, dataset, split_info = prepared
    out = pipeline.train(settings, dataset, split_info, "cnn", "r1")
    storage = open_storage(settings["storage"])
    prefix = model_prefix("r1", "cnn")
    for name in ("metrics.json", "history.json", "predictions.csv", "model.ts", "model_card.json", "checkpoint.pt"):
        assert storage.exists(f"{prefix}/{name}"), name
    metrics = json.loads(storage.get_bytes(f"{prefix}/metrics.json"))
    assert 0 <= metrics["test"]["accuracy"] <= 1 and metrics["epochs"] == 2
    assert out["seconds"] > 0


class _Killed(Exception):
    pass


def test_resume_continues_after_the_last_checkpoint(prepared, caplog, monkeypatch):
    settings, dataset, split_info = prepared
    storage = open_storage(settings["storage"])
    manifest = _manifest(settings, split_info)
    settings = Settings.from_dict(settings)
    settings = settings.replace(per_model={**settings.per_model, "mobilenetv2": TrainPlan(32, 3, 1)})
    kwargs = dict(run_key="r2", model_name="mobilenetv2", manifest=manifest, dataset_id=dataset["dataset_id"],
                  settings=settings)  # fmt: skip
    save = trainer.save_checkpoint

    def save_then_die(*args, epoch, **kw):  # the process is killed right after epoch 1's checkpoint
        save(*args, epoch=epoch, **kw)
        raise _Killed

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        train_model(storage, **kwargs)
    monkeypatch.setattr(trainer, "save_checkpoint", save)
    caplog.set_level("INFO")
    train_model(storage, **kwargs)
    assert "resuming from the checkpoint of epoch 1/3" in caplog.text
    assert "mobilenetv2 epoch 1/3" not in caplog.text  # epoch 1 was not trained again
    history = json.loads(storage.get_bytes(f"{model_prefix('r2', 'mobilenetv2')}/history.json"))
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert [h["frozen"] for h in history] == [True, False, False]


def test_predict_classifies_a_folder_with_an_exported_model(prepared, tmp_path):
    settings, dataset, split_info = prepared
    pipeline.train(settings, dataset, split_info, "cnn", "r3")
    storage = open_storage(settings["storage"])
    model_uri = storage.url(f"{model_prefix('r3', 'cnn')}/model.ts")
    images = write_dataset(tmp_path / "new", 4, seed=9)
    n = predict_folder(model_uri, images, tmp_path / "pred.csv")
    table = pd.read_csv(tmp_path / "pred.csv")
    assert n == 8 and len(table) == 8
    assert set(table["predicted"]) <= {"female", "male"}
    assert table["prob_male"].between(0, 1).all()


def test_a_resumed_run_takes_the_same_learning_rates_as_an_uninterrupted_one(prepared, monkeypatch):
    """The schedule's state rides in the checkpoint: killed after epoch 1 and resumed, the per-step
    warm-up/cosine rates (and the unfreeze's new optimizer) continue where they were."""
    settings, dataset, split_info = prepared
    storage = open_storage(settings["storage"])
    settings = Settings.from_dict(settings)
    assert settings.recipe.schedule == "warmup_cosine"
    settings = settings.replace(per_model={**settings.per_model, "mobilenetv2": TrainPlan(32, 3, 1)})
    kwargs = dict(model_name="mobilenetv2", manifest=_manifest(settings.to_dict(), split_info),
                  dataset_id=dataset["dataset_id"], settings=settings)  # fmt: skip
    train_model(storage, run_key="whole", **kwargs)
    save = trainer.save_checkpoint

    def save_then_die(*args, epoch, **kw):
        save(*args, epoch=epoch, **kw)
        raise _Killed

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        train_model(storage, run_key="resumed", **kwargs)
    monkeypatch.setattr(trainer, "save_checkpoint", save)
    train_model(storage, run_key="resumed", **kwargs)

    def rates(run_key):
        return [
            h["learning_rate"]
            for h in json.loads(storage.get_bytes(f"{model_prefix(run_key, 'mobilenetv2')}/history.json"))
        ]

    assert rates("resumed") == pytest.approx(rates("whole"))
    assert rates("whole")[-1] == pytest.approx(0.0, abs=1e-12)  # the cosine ends at 0


def test_the_ensemble_is_evaluated_and_its_export_loads_with_predict(prepared, tmp_path):
    from gender_tasks.cli import main

    settings, dataset, split_info = prepared
    for model in ("cnn", "mobilenetv2"):
        pipeline.train(settings, dataset, split_info, model, "r4")
    out = pipeline.ensemble(settings, "r4")
    assert out["repeats"][0]["model"] == "ensemble"
    storage = open_storage(settings["storage"])
    prefix = model_prefix("r4", "ensemble")
    metrics = json.loads(storage.get_bytes(f"{prefix}/metrics.json"))
    assert metrics["members"] == ["cnn", "mobilenetv2"] and 0 <= metrics["test"]["accuracy"] <= 1
    preds = pd.read_csv(storage.local_path(f"{prefix}/predictions.csv"))
    members = [pd.read_csv(storage.local_path(f"{model_prefix('r4', m)}/predictions.csv"))
               for m in ("cnn", "mobilenetv2")]  # fmt: skip
    mean = (members[0].set_index("key")["prob_male"] + members[1].set_index("key")["prob_male"]) / 2
    assert preds.set_index("key")["prob_male"].to_numpy() == pytest.approx(mean.loc[preds["key"]].to_numpy())

    images = write_dataset(tmp_path / "new", 3, seed=5)
    model_ts = storage.url(f"{prefix}/model.ts")
    assert main(["predict", "--model", model_ts, "--images", str(images), "--out", str(tmp_path / "e.csv")]) == 0
    table = pd.read_csv(tmp_path / "e.csv")
    assert len(table) == 6 and table["prob_male"].between(0, 1).all() and set(table["predicted"]) <= {"female", "male"}
