import json

import pandas as pd
import pytest
from conftest import write_dataset

from gender_tasks import pipeline
from gender_tasks.predict import predict_folder
from gender_tasks.storage import open_storage
from gender_tasks.train import model_prefix, train_model


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
    from gender_tasks.ingest import read_manifest

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


def test_resume_continues_after_the_last_checkpoint(prepared, caplog):
    settings, dataset, split_info = prepared
    storage = open_storage(settings["storage"])
    manifest = _manifest(settings, split_info)
    settings = {**settings, "per_model": {**settings["per_model"], "mobilenetv2": {"image_size": 32, "epochs": 3,
                                                                                   "freeze_epochs": 1}}}  # fmt: skip
    kwargs = dict(run_key="r2", model_name="mobilenetv2", manifest=manifest, dataset_id=dataset["dataset_id"],
                  settings=settings)  # fmt: skip
    stopped = train_model(storage, stop_after_epoch=1, **kwargs)  # "killed" after epoch 1
    assert stopped == {"model": "mobilenetv2", "stopped_after_epoch": 1}
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
