"""The export format: torch.export `model.pt2`, loaded without a deprecation warning, agreeing with the
in-process model to 1e-5 (each model, and the ensemble as the report scored it), refusing archives that
loading would unpickle or evaluate, and still loading an earlier run's TorchScript `model.ts`."""

from __future__ import annotations

import io
import json
import pickle
import warnings
import zipfile
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import write_dataset

from gender_tasks import layout, pipeline
from gender_tasks.data.images import decode_resize
from gender_tasks.evaluation.predict import ModelFileError, load_exported, load_stored_model
from gender_tasks.integrity import IntegrityError, sha256_hex
from gender_tasks.models.registry import ProfilePlan, get_model_spec
from gender_tasks.settings import Settings
from gender_tasks.storage import open_storage
from gender_tasks.training.batches import Inputs, SplitData
from gender_tasks.training.ensemble import build_ensemble, export_ensemble
from gender_tasks.training.export import _Exportable, export_model
from gender_tasks.training.loop import predict_proba


class _Planted:
    """Unpickling this creates a file: proof that a load ran code from the bytes."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "ran"))


def _randomised(name: str, size: int) -> torch.nn.Module:
    """A freshly built network with BatchNorm statistics that are not the identity (as after training)."""
    torch.manual_seed(1)
    net = get_model_spec(name).build(size, "none")
    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return net.eval()


def _load_strictly(path: Path) -> tuple[torch.nn.Module, dict]:
    """load_exported with any deprecation warning an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        return load_exported(path)


def _stored(folder: Path, data: bytes, name: str = "model.pt2") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    (folder / "model_card.json").write_text(json.dumps({"files": {name: sha256_hex(data)}}))
    return folder / name


@pytest.mark.slow  # torch.export traces every model (seconds each)
@pytest.mark.parametrize(
    "name,size,tta",
    # Every model with flip TTA, as the cpu profile ships them; without it (the paper profile's recipe), one
    # model that normalises its input and one that does not (the mirror averaging is the same for any network).
    [("cnn", 32, True), ("mobilenetv2", 40, True), ("resnet50", 32, True), ("inceptionv3", 75, True),
     ("cnn", 32, False), ("mobilenetv2", 40, False)],
)  # fmt: skip
def test_each_model_exports_and_loads_without_a_warning_agreeing_with_training_to_1e5(tmp_path, name, size, tta):
    net = _randomised(name, size)
    path = _stored(tmp_path / name, export_model(net, name, size, {"seed": 3}, tta=tta))
    module, meta = _load_strictly(path)
    spec = get_model_spec(name)
    assert meta["input_sizes"] == [size] and meta["image_size"] == size and meta["classes"] == ["female", "male"]
    assert meta["tta"] is tta and meta["seed"] == 3
    assert (meta["normalisation"] is not None) is spec.imagenet_normalised
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (7, size, size, 3), dtype=np.uint8))
    split = SplitData(images=images, labels=torch.zeros(7), keys=[str(i) for i in range(7)])
    # In process, as training scored its predictions.csv: its batches, normalisation and mirror averaging.
    expected, _ = predict_proba(net, split, Inputs(name, torch.device("cpu"), False), 4, nullcontext, tta)
    with torch.inference_mode():
        got = module(images.permute(0, 3, 1, 2).float() / 255.0).numpy()
        one = module(images[:1].permute(0, 3, 1, 2).float() / 255.0).numpy()  # the batch dimension is dynamic
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(one, expected[:1], atol=1e-5, rtol=0)


# --- the ensemble: what the report scored --------------------------------------------------------------


@pytest.fixture
def trained_run(tmp_path):
    """cnn at 32 px and mobilenetv2 at 40 px, trained (tiny) into run `r`: members of two sizes."""
    src = write_dataset(tmp_path / "faces", 16)
    run = pipeline.prepare({"source": str(src), "storage": str(tmp_path / "store"), "profile": "tiny",
                            "models": ["cnn", "mobilenetv2"], "min_rows": 10, "epochs": 1})  # fmt: skip
    run = pipeline.split(pipeline.ingest(run))
    settings = Settings.from_dict(run["settings"])
    settings = settings.replace(per_model={**settings.per_model, "mobilenetv2": ProfilePlan(40, 1, 0)})
    run = pipeline.preprocess(pipeline.validate({**run, "settings": settings.to_dict()}))
    for model in ("cnn", "mobilenetv2"):
        pipeline.train({**run, "run_key": "r"}, model)
    return run, open_storage(run["storage"])


def _exported_probs(module, meta, storage, keys) -> np.ndarray:
    """The exported module's P(male) for stored images, each decoded at every input size as `predict` does."""
    per_size = [[decode_resize(storage.get_bytes(k), s) for k in keys] for s in meta["input_sizes"]]
    xs = [torch.from_numpy(np.stack(a)).permute(0, 3, 1, 2).float() / 255.0 for a in per_size]
    with torch.inference_mode():
        return module(*xs).numpy()


@pytest.mark.slow
def test_the_exported_ensemble_agrees_with_the_reports_ensemble_to_1e5(trained_run):
    run, storage = trained_run
    members = ("cnn", "mobilenetv2")
    sizes = {m: json.loads(storage.get_bytes(layout.model_file_key("r", m, "metrics.json")))["image_size"]
             for m in members}  # fmt: skip
    assert sizes == {"cnn": 32, "mobilenetv2": 40}
    preds = {m: pd.read_csv(io.BytesIO(storage.get_bytes(layout.model_file_key("r", m, "predictions.csv"))))
             .set_index("key")["prob_male"] for m in members}  # fmt: skip
    keys = list(preds["cnn"].index)

    # Both members, whatever the selection picks: the mean of each one's own predictions at its own size.
    data = export_ensemble(storage, "r", members, {})
    module, meta = load_exported(_stored(Path(storage.local_path("both")), data))
    assert meta["input_sizes"] == [32, 40] and meta["member_sizes"] == [32, 40]
    report_mean = pd.concat([preds[m] for m in members], axis=1).mean(axis=1).loc[keys].to_numpy()
    np.testing.assert_allclose(_exported_probs(module, meta, storage, keys), report_mean, atol=1e-5, rtol=0)
    # Unequal weights, as the selection gives them: the weighted mean, the weights in the module's metadata.
    data = export_ensemble(storage, "r", members, {}, [0.7, 0.3])
    module, meta = load_exported(_stored(Path(storage.local_path("weighted")), data))
    assert meta["weights"] == [0.7, 0.3] and meta["members"] == list(members)
    report_mix = (0.7 * preds["cnn"] + 0.3 * preds["mobilenetv2"]).loc[keys].to_numpy()
    assert np.abs(report_mix - report_mean).max() > 1e-3  # the weights matter on these images
    np.testing.assert_allclose(_exported_probs(module, meta, storage, keys), report_mix, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="summing to 1"):
        export_ensemble(storage, "r", members, {}, [0.7, 0.7])

    # The ensemble the run builds: its export agrees with its own predictions.csv, which the report reads.
    build_ensemble(storage, run_key="r", settings=Settings.from_dict(run["settings"]))
    module, meta = load_stored_model(storage, layout.model_prefix("r", "ensemble"))
    scored = pd.read_csv(io.BytesIO(storage.get_bytes(layout.model_file_key("r", "ensemble", "predictions.csv"))))
    got = _exported_probs(module, meta, storage, list(scored["key"]))
    np.testing.assert_allclose(got, scored["prob_male"].to_numpy(), atol=1e-5, rtol=0)


# --- archives that would run code are refused, unloaded --------------------------------------------------


@pytest.fixture(scope="module")
def exported() -> bytes:
    return export_model(_randomised("cnn", 32), "cnn", 32, {})


def _rewrite(data: bytes, change) -> bytes:
    """The archive with `change(name, bytes) -> bytes | None` applied to each file (None drops it), plus
    whatever `change` returns for the name "+" (a list of (name, bytes) to add)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            body = change(info.filename, src.read(info.filename))
            if body is not None:
                dst.writestr(info.filename, body)
        for name, body in change("+", b"") or []:
            dst.writestr(name, body)
    return out.getvalue()


def _pickled_weight(marker: Path):
    def change(name, body):
        if name.endswith("model_weights_config.json"):
            config = json.loads(body)
            next(iter(config["config"].values()))["use_pickle"] = True
            return json.dumps(config).encode()
        if name.endswith("data/weights/weight_0"):
            buf = io.BytesIO()
            torch.save({"x": _Planted(marker)}, buf)
            return buf.getvalue()
        return None if name == "+" else body

    return change


def _expression(marker: Path):
    def change(name, body):
        if name.endswith("models/model.json"):
            return body.replace(b"Symbol('s", f"__import__('pathlib').Path('{marker}').write_text('ran') + Symbol('s"
                                .encode(), 1)  # fmt: skip
        return None if name == "+" else body

    return change


def _guards(marker: Path):
    def change(name, body):
        if name.endswith("models/model.json"):
            program = json.loads(body)
            program["guards_code"] = [f"__import__('pathlib').Path('{marker}').write_text('ran')"]
            return json.dumps(program).encode()
        return None if name == "+" else body

    return change


def _opaque(marker: Path):
    def change(name, body):
        if name == "+":
            return [("archive/data/constants/opaque_obj_0", pickle.dumps(_Planted(marker)))]
        return body

    return change


def _sample_inputs(marker: Path):
    def change(name, body):
        if name.endswith("data/sample_inputs/model.pt"):
            buf = io.BytesIO()
            torch.save(((_Planted(marker),), {}), buf)
            return buf.getvalue()
        return None if name == "+" else body

    return change


@pytest.mark.slow  # torch.export of a model for the module (6 s here)
@pytest.mark.parametrize(
    "attack,why",
    [(_pickled_weight, "stored pickled"), (_expression, "shape expression"), (_guards, "not a comparison of input sizes"),
     (_opaque, "opaque_obj_0"), (_sample_inputs, "weights_only=True")],
)  # fmt: skip
def test_an_archive_that_loading_would_unpickle_or_evaluate_is_refused_unloaded(tmp_path, exported, attack, why):
    marker = tmp_path / "MARKER"
    bad = _rewrite(exported, attack(marker))
    path = tmp_path / "model.pt2"
    path.write_bytes(bad)
    # Its sha256 is the expected one (a card and model replaced together): the archive check is what refuses.
    with pytest.raises(ModelFileError, match="is refused unloaded") as err:
        load_exported(path, expected_sha256=sha256_hex(bad))
    assert why in str(err.value) and str(path) in str(err.value) and "give the model.pt2" in str(err.value)
    assert not marker.exists()


# --- a model.ts of an earlier run --------------------------------------------------------------------------


def _torchscript(net: torch.nn.Module, name: str, size: int) -> bytes:
    """A model.ts as earlier versions exported it: TorchScript with meta.json inside."""
    wrapper = _Exportable(net, get_model_spec(name).imagenet_normalised).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapper, torch.rand(2, 3, size, size), check_trace=False)
        buf = io.BytesIO()
        meta = {"model": name, "image_size": size, "classes": ["female", "male"]}
        torch.jit.save(traced, buf, _extra_files={"meta.json": json.dumps(meta)})
    return buf.getvalue()


def test_an_earlier_runs_model_ts_still_loads_verified_with_a_clear_warning(tmp_path, caplog):
    net = _randomised("cnn", 32)
    data = _torchscript(net, "cnn", 32)
    store = tmp_path / "store"
    path = _stored(store / "runs" / "old" / "models" / "cnn", data, name="model.ts")
    caplog.set_level("WARNING")
    module, meta = load_exported(path)
    assert meta["input_sizes"] == [32]
    assert "is TorchScript (model.ts), exported by an earlier version" in caplog.text
    assert "train the run again to get a model.pt2" in caplog.text
    x = torch.rand(3, 3, 32, 32)
    with torch.inference_mode():
        np.testing.assert_allclose(module(x).numpy(), _Exportable(net, False)(x).numpy(), atol=1e-6)
    storage = open_storage(str(store))
    _, meta = load_stored_model(storage, layout.model_prefix("old", "cnn"))  # the card records model.ts
    assert meta["model"] == "cnn"
    path.write_bytes(data[:-10] + b"0123456789")  # changed: refused by its checksum, before any load
    with pytest.raises(IntegrityError, match="is corrupt"):
        load_exported(path)
    with pytest.raises(IntegrityError, match="is corrupt"):
        load_stored_model(storage, layout.model_prefix("old", "cnn"))
