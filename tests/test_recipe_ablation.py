"""bench/recipe_ablation.py drives the pipeline's training (issue 22): for a given seed, its line of a
configuration is what the pipeline's training produces with the same data, recipe and seed."""

from __future__ import annotations

import importlib.util
import io
import json
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import REPO, write_dataset

from gender_tasks import layout, pipeline
from gender_tasks.data.manifest import read_manifest
from gender_tasks.settings import PROFILES, Recipe, resolve_settings
from gender_tasks.storage import open_storage


def _ablation():
    """The script as a module (registered first: its dataclasses look their module up while defined)."""
    if "recipe_ablation" not in sys.modules:
        spec = importlib.util.spec_from_file_location("recipe_ablation", REPO / "bench" / "recipe_ablation.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["recipe_ablation"] = module
        spec.loader.exec_module(module)
    return sys.modules["recipe_ablation"]


def test_configurations_are_recipes_on_the_pipelines_settings():
    ab = _ablation()
    for name, cfg in ab.CONFIGS.items():
        assert isinstance(cfg.recipe, Recipe), name
        train_name, _ = ab.config_of(name)
        # A configuration that reads another's runs trains exactly like it (only tta / best_epoch differ).
        trained = ab.CONFIGS[train_name]
        assert ab.CONFIGS[train_name].base is None
        assert {**vars(cfg), "base": None, "best_epoch": False, "recipe": None} == {
            **vars(trained), "best_epoch": False, "recipe": None}, name  # fmt: skip
        assert vars(cfg.recipe) | {"tta": False} == vars(trained.recipe) | {"tta": False}, name
    # The run's settings are the pipeline's: its plans of the profile, the configuration's recipe and rates.
    settings = ab.run_settings(ab.CONFIGS["combo_ep2x"], "mobilenetv2", 5)
    pipeline_plan = resolve_settings({"profile": "cpu", "models": ["mobilenetv2"], "epochs": 10}).per_model
    assert settings.per_model == pipeline_plan and settings.seed == 5
    assert (settings.recipe, settings.learning_rate, settings.batch_size) == (ab.COMBO.recipe, 2e-3, 32)
    cpu = ab.run_settings(ab.CONFIGS["cpu"], "cnn", 0)
    assert (cpu.recipe, cpu.learning_rate, cpu.batch_size) == (PROFILES["cpu"].recipe, 2e-3, 32)
    assert ab.model_size(ab.CONFIGS["size80"], "inceptionv3") == 80 and ab.model_size(ab.BASELINE, "inceptionv3") == 75


@pytest.mark.slow
def test_the_ablations_cnn_line_is_the_pipelines_training(tmp_path, monkeypatch, capsys):
    seed = 3
    src = write_dataset(tmp_path / "faces", 20)
    files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*.jpg"))
    # The ablation reads (file, label) from labels.csv, as the shared faces give them; listed in reverse,
    # so its manifest's order (the pipeline's: label, sha256, path) is its own doing.
    pd.DataFrame({"file": files[::-1], "label": [f.split("/")[0] for f in files[::-1]]}).to_csv(
        src / "labels.csv", index=False)  # fmt: skip

    # The pipeline: the tiny profile (its recipe: AdamW, warm-up + cosine, smoothing, flips, TTA), one epoch.
    run = pipeline.prepare({"source": str(src), "storage": str(tmp_path / "store"), "profile": "tiny",
                            "models": ["cnn"], "min_rows": 10, "seed": seed, "epochs": 1})  # fmt: skip
    run = pipeline.preprocess(pipeline.validate(pipeline.split(pipeline.ingest(run))))
    pipeline.train(run, "cnn")
    storage = open_storage(str(tmp_path / "store"))
    read = lambda name: storage.get_bytes(layout.model_file_key(run["run_key"], "cnn", name))  # noqa: E731
    preds = pd.read_csv(io.BytesIO(read("predictions.csv")))
    metrics, history = json.loads(read("metrics.json")), json.loads(read("history.json"))
    split = read_manifest(storage, run["split"]["split_key"])

    # The ablation: the same recipe, rates and plan (the tiny profile at one epoch), the same seed.
    ab = _ablation()
    monkeypatch.setitem(ab.CONFIGS, "tiny_1epoch", ab.profile_config("tiny", epochs=1))
    records = tmp_path / "runs.jsonl"
    ab.main(["--source", str(src), "--cache", str(tmp_path / "cache"), "--records", str(records), "--seeds",
             str(seed), "--models", "cnn", "--configs", "tiny_1epoch", "--threads", str(torch.get_num_threads())])  # fmt: skip
    table = capsys.readouterr().out

    # The same split, image for image and in the same order.
    manifest, _ = ab.load_faces(src, tmp_path / "cache", set())
    for s, idx in ab.split_indices(manifest, seed).items():
        rows = split[split["split"] == s].drop_duplicates("sha256")
        assert manifest["sha256"].iloc[idx].tolist() == rows["sha256"].tolist(), s
        assert manifest["sha256"].iloc[idx].tolist() == preds.loc[preds["split"] == s, "key"].map(
            dict(zip(split["key"], split["sha256"], strict=True))).tolist(), s  # fmt: skip

    # The same training: the epoch's loss (summed on the device, float64) to the last bit, then the same
    # P(male) of every val and test image (TTA, as the recipe reads them; the record keeps 5 decimals).
    (rec,) = [json.loads(line) for line in records.read_text().splitlines()]
    assert rec["loop"] == ab.LOOP and rec["epochs"] == 1 == len(history)
    assert [e["train_loss"] for e in rec["per_epoch"]] == [h["loss"] for h in history]
    for s in ("val", "test"):
        expected = preds.loc[preds["split"] == s, "prob_male"].to_numpy(np.float32).round(5)
        assert np.array_equal(np.asarray(rec["per_epoch"][-1][f"{s}_tta"], np.float32), expected), s

    # The CNN line of the table: the pipeline's validation and test accuracy.
    (line,) = [row for row in table.splitlines() if row.startswith("| tiny_1epoch | cnn |")]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[5] == f"{history[-1]['val_accuracy']:.3f} ± 0.000"
    assert cells[6] == f"{metrics['test']['accuracy']:.3f} ± 0.000"
    assert (cells[2], cells[3], cells[4]) == ("32", "1", "1")  # size, epochs, seeds
