"""No code runs from stored checkpoints or models, and model files are verified when they are read.

Checkpoints load weights-only, checked against the sha256 their sidecar recorded; a bad one is
discarded and training restarts in the same attempt. A model's files are checked against the sha256s
its model card records before they are reused, copied into a run or loaded; `predict` refuses a bad
model or folder in one line.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import copy_prepared, write_dataset

from gender_tasks import layout, pipeline
from gender_tasks.cli import main
from gender_tasks.evaluation.predict import ModelFileError, load_exported, load_stored_model, predict_folder
from gender_tasks.integrity import IntegrityError, sha256_hex
from gender_tasks.models.network import build_model
from gender_tasks.storage import LocalStorage, open_storage
from gender_tasks.training import checkpoint as ckpt
from gender_tasks.training import trainer
from gender_tasks.training.export import export_model


class _Planted:
    """A pickle whose loading would run code: it creates the file `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _planted_pickle(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"model": _Planted(marker), "epoch": 0}, buf)  # a real torch zip file, with a global in it
    return buf.getvalue()


def _sidecar(data: bytes) -> bytes:
    return json.dumps({"sha256": sha256_hex(data), "bytes": len(data)}).encode()


# --- checkpoints (fast: a small module, no training) ------------------------------------------------


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 1))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.rand(5, 4)).sum().backward()
    optimizer.step()  # Adam's moments: tensors and a step count in the optimizer state
    return net, optimizer


KEY = "datasets/d/models/cnn/k/checkpoint.pt"


def test_a_checkpoint_round_trips_weights_only_with_its_sidecar(local_storage, tiny_net):
    net, optimizer = tiny_net
    history = [{"epoch": 1, "frozen": True, "learning_rate": 1e-3, "loss": 0.5, "val_loss": float("nan")}]
    ckpt.save_checkpoint(local_storage, KEY, model=net, optimizer=optimizer, epoch=0, frozen=True, history=history)
    data = local_storage.get_bytes(KEY)
    record = json.loads(local_storage.get_bytes("datasets/d/models/cnn/k/checkpoint.json"))
    assert record == {"sha256": sha256_hex(data), "bytes": len(data)}
    state = ckpt.load_checkpoint(local_storage, KEY, net)
    assert state["epoch"] == 0 and state["frozen"] is True and state["history"][0]["loss"] == 0.5
    assert torch.equal(state["model"]["0.weight"], net.state_dict()["0.weight"])
    fresh = torch.optim.AdamW(net.parameters(), lr=1e-3)
    fresh.load_state_dict(state["optimizer"])
    assert fresh.state_dict()["state"][0]["step"] == 1
    ckpt.discard_checkpoint(local_storage, KEY)
    assert local_storage.list("datasets/") == []


def _expect_discarded(storage, net, caplog, reason: str) -> None:
    caplog.set_level("WARNING", logger="gender_tasks.training.checkpoint")
    assert ckpt.load_checkpoint(storage, KEY, net) is None
    assert storage.list("datasets/") == []  # the checkpoint and its sidecar are gone
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert storage.url(KEY) in warning and reason in warning, warning


def test_a_planted_pickle_with_a_matching_sidecar_is_refused_unexecuted(local_storage, tiny_net, tmp_path, caplog):
    marker = tmp_path / "MARKER"
    data = _planted_pickle(marker)
    local_storage.put_bytes(KEY, data)
    local_storage.put_bytes(ckpt.record_key(KEY), _sidecar(data))  # the attacker wrote the sidecar too
    _expect_discarded(local_storage, tiny_net[0], caplog, "torch cannot load it as weights")
    assert not marker.exists()
    torch.load(io.BytesIO(data), weights_only=False)  # what the old loader did: it runs the planted code
    assert marker.exists()  # (the planted pickle is live: the check above could fail)


@pytest.mark.parametrize("case", ["no sidecar", "truncated", "truncated, sidecar too", "other checkpoint's bytes",
                                  "other model", "not json sidecar"])  # fmt: skip
def test_a_bad_checkpoint_is_discarded_naming_the_object_and_why(local_storage, tiny_net, caplog, case):
    net, optimizer = tiny_net
    ckpt.save_checkpoint(local_storage, KEY, model=net, optimizer=optimizer, epoch=0, frozen=False,
                         history=[{"epoch": 1}])  # fmt: skip
    good = local_storage.get_bytes(KEY)
    reason = "sha256 is not the one recorded"
    if case == "no sidecar":
        local_storage.delete(ckpt.record_key(KEY))
        reason = "no checksum record"
    elif case == "truncated":  # killed while writing: the sidecar still describes the whole file
        local_storage.put_bytes(KEY, good[: len(good) // 2])
    elif case == "truncated, sidecar too":  # the bytes match their record, torch cannot read them
        local_storage.put_bytes(KEY, good[: len(good) // 2])
        local_storage.put_bytes(ckpt.record_key(KEY), _sidecar(good[: len(good) // 2]))
        reason = "torch cannot load it as weights"
    elif case == "other checkpoint's bytes":  # a valid checkpoint, but not the one the sidecar recorded
        ckpt.save_checkpoint(local_storage, "other/checkpoint.pt", model=net, optimizer=optimizer, epoch=1,
                             frozen=False, history=[{"epoch": 1}, {"epoch": 2}])  # fmt: skip
        local_storage.put_bytes(KEY, local_storage.get_bytes("other/checkpoint.pt"))
        local_storage.delete("other/checkpoint.pt")
        local_storage.delete("other/checkpoint.json")
    elif case == "other model":  # sound bytes, recorded, but the weights of another network
        other = torch.nn.Linear(4, 1)
        ckpt.save_checkpoint(local_storage, KEY, model=other, optimizer=torch.optim.Adam(other.parameters()),
                             epoch=0, frozen=False, history=[{"epoch": 1}])  # fmt: skip
        reason = "not those of this model"
    else:
        local_storage.put_bytes(ckpt.record_key(KEY), b"{not json")
        reason = "not valid JSON"
    _expect_discarded(local_storage, net, caplog, reason)


def test_checkpoint_sidecars_are_collected_like_checkpoints():
    key = layout.trained_file_key("d", "cnn", "k", layout.CHECKPOINT_RECORD)
    assert layout.describe_key(key) == ("checkpoint", "d", layout.trained_prefix("d", "cnn", "k"))
    assert ckpt.record_key(layout.trained_file_key("d", "cnn", "k", layout.CHECKPOINT)) == key


# --- training restarts from a bad checkpoint, in the same attempt (tiny training) -------------------


class _Killed(Exception):
    pass


@pytest.fixture(scope="module")
def prepared_once(tmp_path_factory):
    """Ingested, split, validated and preprocessed once for the module: (its folder, the run record)."""
    base = tmp_path_factory.mktemp("prepared")
    src = write_dataset(base / "faces", 12)
    run = pipeline.prepare({"source": str(src), "storage": str(base / "store"), "profile": "tiny",
                            "models": ["cnn"], "min_rows": 10})  # fmt: skip
    return base, pipeline.preprocess(pipeline.validate(pipeline.split(pipeline.ingest(run))))


@pytest.fixture
def prepared(prepared_once, tmp_path):
    """The prepared run, copied for this test (the tests kill, spoil and train in its storage)."""
    return copy_prepared(*prepared_once, tmp_path / "prepared")


def _keyed(run: dict, train_key: str, name: str) -> str:
    return layout.trained_file_key(run["dataset"]["dataset_id"], "cnn", train_key, name)


def _killed_after_epoch(run: dict, monkeypatch, last: int = 0) -> None:
    """Train `run`'s cnn until the checkpoint of epoch `last` (0-based) is written, then die."""
    save = trainer.save_checkpoint

    def save_then_die(*args, epoch, **kw):
        save(*args, epoch=epoch, **kw)
        if epoch == last:
            raise _Killed

    with monkeypatch.context() as m:
        m.setenv(trainer.CHECKPOINT_EVERY_VAR, "0")  # a checkpoint after every epoch
        m.setattr(trainer, "save_checkpoint", save_then_die)
        with pytest.raises(_Killed):
            pipeline.train(run, "cnn")


@pytest.mark.slow
@pytest.mark.parametrize("bad", ["planted pickle", "truncated", "sidecar mismatch"])
def test_training_restarts_from_the_first_epoch_over_a_bad_checkpoint(prepared, tmp_path, monkeypatch, caplog,
                                                                       bad):  # fmt: skip
    storage = open_storage(prepared["storage"])
    _killed_after_epoch(prepared, monkeypatch)  # a killed run leaves epoch 1's checkpoint and sidecar
    [key] = [k for k in storage.list("datasets/") if k.endswith("/" + layout.CHECKPOINT)]
    data = storage.get_bytes(key)
    marker = tmp_path / "MARKER"
    if bad == "planted pickle":  # planted in the bucket after the killed run, sidecar and all
        data = _planted_pickle(marker)
        storage.put_bytes(key, data)
        storage.put_bytes(ckpt.record_key(key), _sidecar(data))
    elif bad == "truncated":
        storage.put_bytes(key, data[: len(data) // 3])
    else:  # valid checkpoint bytes, but not the ones recorded
        record = json.loads(storage.get_bytes(ckpt.record_key(key)))
        storage.put_bytes(ckpt.record_key(key), json.dumps({**record, "sha256": "0" * 64}).encode())
    caplog.set_level("INFO")
    out = pipeline.train({**prepared, "run_key": "rerun"}, "cnn")  # the same attempt: no error, no retry
    assert out["reused"] is False and not marker.exists()
    assert f"discarding the checkpoint {storage.url(key)}" in caplog.text
    assert "cnn: resuming" not in caplog.text and "cnn epoch 1/2" in caplog.text  # from the first epoch
    history = json.loads(storage.get_bytes(layout.model_file_key("rerun", "cnn", "history.json")))
    assert [h["epoch"] for h in history] == [1, 2]
    assert not storage.exists(key) and not storage.exists(ckpt.record_key(key))  # exported: both removed


@pytest.mark.slow
def test_a_sound_checkpoint_is_still_resumed(prepared, monkeypatch, caplog):
    _killed_after_epoch(prepared, monkeypatch)
    caplog.set_level("INFO")
    pipeline.train({**prepared, "run_key": "rerun"}, "cnn")
    assert "cnn: resuming at epoch 2/2" in caplog.text and "discarding" not in caplog.text
    assert "cnn epoch 1/2" not in caplog.text


@pytest.mark.slow
def test_a_resume_within_one_phase_takes_the_uninterrupted_learning_rates(prepared, monkeypatch):
    """Killed after epoch 1 of 3 with no unfreeze between: the optimizer's state is loaded and the
    schedule continues at the checkpoint's step (it once counted the steps taken twice)."""
    settings = json.loads(json.dumps(prepared["settings"]))
    settings["per_model"]["cnn"] = {"image_size": 32, "epochs": 3, "freeze_epochs": 0}
    settings["batch_size"] = 4  # several steps an epoch: a warm-up, then a cosine that is not yet 0
    assert settings["recipe"]["schedule"] == "warmup_cosine"
    whole = pipeline.train({**prepared, "settings": {**settings, "seed": settings["seed"] + 1}, "run_key": "w"}, "cnn")
    run = {**prepared, "settings": settings, "run_key": "r"}
    _killed_after_epoch(run, monkeypatch, last=0)
    resumed = pipeline.train(run, "cnn")
    assert resumed["reused"] is False and resumed["train_key"] != whole["train_key"]
    storage = open_storage(prepared["storage"])

    def rates(run_key):
        history = json.loads(storage.get_bytes(layout.model_file_key(run_key, "cnn", "history.json")))
        assert [h["frozen"] for h in history] == [False] * 3
        return [h["learning_rate"] for h in history]

    assert rates("r") == pytest.approx(rates("w"))
    assert 0 < rates("w")[1] < rates("w")[0] and rates("w")[-1] == pytest.approx(0.0, abs=1e-12)


# --- a trained model's files, verified before reuse, copy and load ---------------------------------


@pytest.fixture(scope="module")
def trained_once(prepared_once, tmp_path_factory):
    """The tiny cnn trained once for the module into run r1 of a copy of the prepared run:
    (its folder, [the run record, the train key])."""
    base = tmp_path_factory.mktemp("trained") / "run"
    run = copy_prepared(*prepared_once, base)
    return base, [run, pipeline.train({**run, "run_key": "r1"}, "cnn")["train_key"]]


@pytest.fixture
def trained(trained_once, tmp_path):
    """The trained run, copied for this test (the tests tamper with its files); (run, storage, train_key)."""
    run, train_key = copy_prepared(*trained_once, tmp_path / "trained")
    return run, open_storage(run["storage"]), train_key


def _tamper_weights(data: bytes) -> bytes:
    """The same torch.export archive with every weight scaled: a model that loads and answers differently."""
    extra = {"meta.json": ""}
    program = torch.export.load(io.BytesIO(data), extra_files=extra)
    with torch.no_grad():
        for tensor in program.state_dict.values():
            tensor.mul_(-3.0)
    buf = io.BytesIO()
    torch.export.save(program, buf, extra_files=extra)
    return buf.getvalue()


@pytest.mark.slow
def test_the_model_card_and_trained_record_hold_every_files_sha256(trained):
    run, storage, train_key = trained
    card = json.loads(storage.get_bytes(_keyed(run, train_key, "model_card.json")))
    record = json.loads(storage.get_bytes(layout.model_file_key("r1", "cnn", "trained.json")))
    assert set(card["files"]) == {"predictions.csv", "history.json", "metrics.json", "model.pt2"}
    for name, sha in card["files"].items():
        assert sha256_hex(storage.get_bytes(_keyed(run, train_key, name))) == sha, name
        assert record["files"][name] == sha
    assert record["files"]["model_card.json"] == sha256_hex(storage.get_bytes(_keyed(run, train_key,
                                                                                      "model_card.json")))  # fmt: skip
    assert not [k for k in storage.list("") if k.endswith(("checkpoint.pt", "checkpoint.json"))]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["model.pt2", "predictions.csv"])
def test_a_changed_file_of_a_keyed_model_refuses_its_reuse(trained, monkeypatch, name):
    run, storage, train_key = trained
    key = _keyed(run, train_key, name)
    data = storage.get_bytes(key)
    storage.put_bytes(key, _tamper_weights(data) if name == "model.pt2" else data.replace(b"0.", b"9.", 1))
    monkeypatch.setattr(trainer, "_fit", lambda *a: pytest.fail("a changed model must not be trained over"))
    with pytest.raises(IntegrityError) as err:
        pipeline.train({**run, "run_key": "r2"}, "cnn")
    message = str(err.value)
    assert storage.url(key) in message and "is corrupt" in message
    assert f"verify --storage {storage.uri} --repair" in message
    assert storage.list(layout.model_prefix("r2", "cnn")) == []  # nothing copied into the run


@pytest.mark.slow
def test_a_keyed_model_of_an_earlier_version_without_checksums_is_trained_again(trained, caplog):
    run, storage, train_key = trained
    card_key = _keyed(run, train_key, "model_card.json")
    card = json.loads(storage.get_bytes(card_key))
    del card["files"]
    storage.put_bytes(card_key, json.dumps(card).encode())
    caplog.set_level("INFO")
    out = pipeline.train({**run, "run_key": "r2"}, "cnn")
    assert out["reused"] is False and "records no checksums of its files" in caplog.text
    assert "files" in json.loads(storage.get_bytes(card_key))  # replaced by a verifiable one


@pytest.mark.slow
def test_a_changed_model_in_a_run_folder_is_refused_by_predict_naming_it(trained, tmp_path, capsys):
    run, storage, _ = trained
    key = layout.model_file_key("r1", "cnn", "model.pt2")
    images = write_dataset(tmp_path / "new", 2, seed=4)
    assert predict_folder(storage.url(key), images, tmp_path / "ok.csv") == 4  # intact: verified and used
    storage.put_bytes(key, _tamper_weights(storage.get_bytes(key)))
    for model in (storage.url(key), str(storage.local_path(key))):
        with pytest.raises(IntegrityError, match="is corrupt") as err:
            load_exported(model)
        assert model in str(err.value) and f"{storage.root} --repair" in str(err.value)
    with pytest.raises(IntegrityError, match="is corrupt"):
        load_stored_model(storage, layout.model_prefix("r1", "cnn"))
    assert (
        main(["predict", "--model", storage.url(key), "--images", str(images), "--out", str(tmp_path / "p.csv")]) == 2
    )
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith(f"error: {storage.url(key)} is corrupt")
    assert not (tmp_path / "p.csv").exists()


# --- loading model files: fast, with an untrained exported network ----------------------------------


@pytest.fixture(scope="module")
def exported() -> bytes:
    torch.manual_seed(0)
    return export_model(build_model("cnn", 32, "none"), "cnn", 32, {"source": "test"})


def _run_folder(root: Path, model: bytes, files: dict | None = None, name: str = "model.pt2") -> Path:
    """A run's model folder in a local storage at `root`: the model file and a card recording its sha256."""
    folder = root / "runs" / "r" / "models" / "cnn"
    folder.mkdir(parents=True)
    (folder / name).write_bytes(model)
    card = {"model": "cnn", "files": files if files is not None else {name: sha256_hex(model)}}
    (folder / "model_card.json").write_bytes(json.dumps(card).encode())
    return folder / name


def test_a_planted_pickle_as_model_pt2_is_refused_by_its_checksum_before_any_load(tmp_path, exported, monkeypatch):
    path = _run_folder(tmp_path / "store", exported)
    marker = tmp_path / "MARKER"
    path.write_bytes(pickle.dumps(_Planted(marker)))
    loads = []
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: loads.append(a) or pytest.fail("loaded"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or pytest.fail("loaded"))
    monkeypatch.setattr(torch.export, "load", lambda *a, **k: loads.append(a) or pytest.fail("loaded"))
    storage = LocalStorage(tmp_path / "store")
    for model in (str(path), path.as_uri()):
        with pytest.raises(IntegrityError, match="is corrupt") as err:
            load_exported(model)
        assert model in str(err.value) and f"{tmp_path / 'store'} --repair" in str(err.value)
    with pytest.raises(IntegrityError, match=f"verify --storage {storage.uri} --repair"):
        load_stored_model(storage, "runs/r/models/cnn")
    with pytest.raises(IntegrityError, match="is corrupt"):
        load_exported(path, expected_sha256=sha256_hex(exported))
    assert loads == [] and not marker.exists()


def test_a_model_in_any_registered_storage_loads_verified_by_its_card(mem_storage, exported):
    # mem:// is the test backend (memory_storage.py): predict reads a storage URI through the scheme registry
    folder = "runs/r/models/cnn"
    mem_storage.put_bytes(f"{folder}/model.pt2", exported)
    mem_storage.put_bytes(
        f"{folder}/model_card.json", json.dumps({"files": {"model.pt2": sha256_hex(exported)}}).encode()
    )
    url = mem_storage.url(f"{folder}/model.pt2")
    module, meta = load_exported(url)
    assert meta["image_size"] == 32 and module(torch.rand(1, 3, 32, 32)).shape == (1,)
    mem_storage.put_bytes(f"{folder}/model.pt2", exported + b"\0")  # changed in storage since
    with pytest.raises(IntegrityError, match="is corrupt") as err:
        load_exported(url)
    assert url in str(err.value) and f"verify --storage {mem_storage.uri} --repair" in str(err.value)
    with pytest.raises(ModelFileError, match=rf"model {mem_storage.uri}/nope\.pt2 does not exist"):
        load_exported(f"{mem_storage.uri}/nope.pt2")


def test_a_standalone_model_loads_with_a_warning_and_an_expected_sha256_is_enforced(tmp_path, exported, caplog):
    path = tmp_path / "mine.pt2"
    path.write_bytes(exported)
    caplog.set_level("WARNING")
    module, meta = load_exported(path)
    assert meta["image_size"] == 32 and module(torch.rand(1, 3, 32, 32)).shape == (1,)
    assert f"{path} cannot be verified: no model_card.json beside it" in caplog.text
    caplog.clear()
    load_exported(path, expected_sha256=sha256_hex(exported))  # verified: no warning
    assert "cannot be verified" not in caplog.text
    with pytest.raises(IntegrityError, match="mine.pt2 is corrupt"):
        load_exported(path, expected_sha256="0" * 64)


def test_a_stored_model_needs_its_card(tmp_path, exported):
    path = _run_folder(tmp_path / "store", exported)
    storage = LocalStorage(tmp_path / "store")
    module, meta = load_stored_model(storage, "runs/r/models/cnn")
    assert meta["model"] == "cnn"
    (path.parent / "model_card.json").write_bytes(json.dumps({"model": "cnn", "files": {"model.pt2": "x"}}).encode())
    with pytest.raises(IntegrityError, match="records no valid sha256 for model.pt2"):
        load_stored_model(storage, "runs/r/models/cnn")
    (path.parent / "model_card.json").write_bytes(b"\x00garbage")
    with pytest.raises(IntegrityError, match="model_card.json is not a model card"):
        load_exported(path)
    (path.parent / "model_card.json").unlink()
    with pytest.raises(IntegrityError, match="model_card.json is missing"):
        load_stored_model(storage, "runs/r/models/cnn")


# --- the predict command: one line and exit 2 for each mistake --------------------------------------


def _predict(capsys, model, images, out) -> tuple[int, list[str]]:
    code = main(["predict", "--model", str(model), "--images", str(images), "--out", str(out)])
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()


def _one_line_error(code: int, lines: list[str], *parts: str) -> None:
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "Traceback" not in lines[0]
    for part in parts:
        assert part in lines[0], (part, lines[0])


def test_predict_refuses_a_missing_or_non_model_file_in_one_line(tmp_path, exported, capsys):
    images = write_dataset(tmp_path / "imgs", 1)
    out = tmp_path / "out.csv"
    with pytest.raises(ModelFileError):  # permanent: the DAG fails it without retries
        load_exported(tmp_path / "nope.pt2")
    code, lines = _predict(capsys, tmp_path / "nope.pt2", images, out)
    _one_line_error(code, lines, "nope.pt2 does not exist", "give the model.pt2 of a trained run")
    code, lines = _predict(capsys, (tmp_path / "nope.pt2").as_uri(), images, out)
    _one_line_error(code, lines, "does not exist")
    jpeg = next((images / "male").iterdir())
    code, lines = _predict(capsys, jpeg, images, out)
    _one_line_error(code, lines, f"{jpeg} is not a model exported by this pipeline", "give the model.pt2")
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(exported[: len(exported) // 2])
    code, lines = _predict(capsys, truncated, images, out)
    _one_line_error(code, lines, "truncated.pt2 is not a model exported by this pipeline")
    code, lines = _predict(capsys, tmp_path, images, out)
    _one_line_error(code, lines, "is a folder, not a model file")
    assert not out.exists()


def test_predict_refuses_a_missing_or_empty_images_folder_in_one_line(tmp_path, exported, capsys):
    model = tmp_path / "model.pt2"
    model.write_bytes(exported)
    out = tmp_path / "out.csv"
    code, lines = _predict(capsys, model, tmp_path / "missing", out)
    _one_line_error(code, lines, "images folder", "missing does not exist", "--images")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    code, lines = _predict(capsys, model, tmp_path / "empty", out)
    _one_line_error(code, lines, "no images", "empty", "give a folder that holds images")
    code, lines = _predict(capsys, model, model, out)
    _one_line_error(code, lines, "is not a folder")
    assert not out.exists()


@pytest.mark.timeout(60)
def test_predict_skips_fifos_and_links_out_of_the_folder_without_opening_them(tmp_path, exported, capsys):
    model = tmp_path / "model.pt2"
    model.write_bytes(exported)
    images = write_dataset(tmp_path / "imgs", 2)
    os.mkfifo(images / "female" / "pipe.jpg")  # opened for reading, a FIFO would block forever
    outside = write_dataset(tmp_path / "outside", 1)
    (images / "male" / "link.jpg").symlink_to(next((outside / "male").iterdir()))
    (images / "linked").symlink_to(outside, target_is_directory=True)  # not searched
    inside = images / "female" / "inside.jpg"
    inside.symlink_to(next((images / "female").glob("female_*.jpg")))  # a link inside the folder is fine
    out = tmp_path / "out.csv"
    assert main(["predict", "--model", str(model), "--images", str(images), "--out", str(out)]) == 0
    table = pd.read_csv(out, keep_default_na=False).set_index("file")
    assert len(table) == 4 + 1 + 2  # the images, the link inside, the two skipped entries
    assert "not a regular file" in table.loc[str(images / "female" / "pipe.jpg"), "error"]
    assert "symbolic link out of the images folder" in table.loc[str(images / "male" / "link.jpg"), "error"]
    assert table.loc[str(inside), "error"] == "" and table.loc[str(inside), "predicted"] in {"female", "male"}
    assert not any("linked" in f for f in table.index)


def test_predict_passes_over_what_macos_and_windows_write_and_names_a_non_image_plainly(tmp_path, exported, caplog):
    # A folder copied from a Mac or unpacked from a Finder zip: a `._name` twin of each image (AppleDouble, named
    # like an image), `__MACOSX/`, and Windows' Thumbs.db. They are no images a user gave, so no rows for them.
    model = tmp_path / "model.pt2"
    model.write_bytes(exported)
    images = write_dataset(tmp_path / "imgs", 2)
    twin = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        "
    for image in sorted(images.rglob("*.jpg")):
        (image.parent / f"._{image.name}").write_bytes(twin)
    (images / "__MACOSX" / "female").mkdir(parents=True)
    (images / "__MACOSX" / "female" / "._female_0000.jpg").write_bytes(twin)
    (images / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (images / "male" / "notes.jpg").write_text("a text file named like an image")
    out = tmp_path / "out.csv"
    with caplog.at_level("WARNING", logger="gender_tasks.data.folders"):
        assert predict_folder(model, images, out) == 4 + 1
    table = pd.read_csv(out, keep_default_na=False).set_index("file")
    given = [p.name for p in images.rglob("*.jpg") if not p.name.startswith(".")]
    assert sorted(Path(f).name for f in table.index) == sorted(given) and len(given) == 5
    # Pillow's own text names the in-memory buffer by its address (<_io.BytesIO object at 0x7f...>): not said
    assert (
        table.loc[str(images / "male" / "notes.jpg"), "error"] == "UnidentifiedImageError: cannot identify image file"
    )
    assert "skipped 6 hidden or system file(s) or folder(s)" in caplog.text


@pytest.mark.slow
def test_python_m_predict_given_a_jpeg_as_the_model_prints_one_line(tmp_path):
    """The real command, logging and library warnings included: one line on stderr, exit 2."""
    images = write_dataset(tmp_path / "imgs", 1)
    jpeg = next((images / "female").iterdir())
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run([sys.executable, "-m", "gender_tasks", "predict", "--model", str(jpeg), "--images",
                           str(images), "--out", str(tmp_path / "out.csv")], capture_output=True, text=True, env=env,
                          timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()  # no log lines, no library warnings, no traceback
    assert line.startswith(f"error: {jpeg} is not a model exported by this pipeline (neither a torch.export archive "
                           "nor TorchScript: ")  # fmt: skip
    assert line.endswith("): give the model.pt2 of a trained run (runs/<run_key>/models/<model>/model.pt2 in the "
                         "storage, or its URI)")  # fmt: skip
    assert done.stdout == "" and not (tmp_path / "out.csv").exists()
