"""A finished run's outputs, written straight into a storage without training: what the report reads.

`write_run` writes, for each repeat, every model's predictions.csv, metrics.json and history.json (one
model, mobilenetv2, collapsed to one class, so the report flags it; resnet50 with its BatchNorm statistics
recalibrated), the ensemble of the two healthy models, and, once: the split, the dataset's images (tiny
PNGs) and attributes, the label audit's table and an external set's results. Names and attribute values
carry markup and spreadsheet formulas. It returns build_report's keyword arguments. Everything is fixed
by the seeds below, so two calls write the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pandas as pd

from gender_tasks import layout, tables
from gender_tasks.data.manifest import write_manifest
from gender_tasks.evaluation.metrics import classification_metrics, encode_labels
from gender_tasks.evaluation.stats import bootstrap_ci
from gender_tasks.settings import ENSEMBLE, resolve_settings
from gender_tasks.storage import put_recorded
from gender_tasks.training.label_audit import audit_table

DATASET_ID = "ds-fixture"
MODELS = ("cnn", "resnet50", "mobilenetv2")
FLAGGED = "mobilenetv2"
SIZES = {"train": 16, "val": 20, "test": 20}  # images per split, half of each class
HOSTILE_PATH = "<script>alert(1)</script>/female_000.png"
FORMULA_PATH = '=HYPERLINK("http://example.invalid","x")/male_000.png'
HOSTILE_RUN_ID = "manual__<b>x</b>"
EXTERNAL_SET = "real_age_30"
# resnet50's last epoch: its BatchNorm statistics recomputed after training (training.loop)
RECALIBRATED = {"batchnorm_recalibrated_on": 16, "val_accuracy_before_recalibration": 0.5}


def _png(i: int) -> bytes:
    from PIL import Image

    img = Image.new("RGB", (8, 8), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _split_rows(storage) -> pd.DataFrame:
    """The split: one stored PNG per row, keyed by its content as ingest keys images."""
    rows = []
    for split, n in SIZES.items():
        for label in ("female", "male"):
            for i in range(n // 2):
                rows.append({"split": split, "label": label, "source_path": f"{label}/{label}_{split}_{i:03d}.png"})
    rows[0]["source_path"] = HOSTILE_PATH  # a female training image
    rows[SIZES["train"] // 2]["source_path"] = FORMULA_PATH  # a male training image
    for i, row in enumerate(rows):
        data = _png(i)
        row["sha256"] = hashlib.sha256(data).hexdigest()
        row["key"] = layout.image_key(DATASET_ID, row["label"], row["sha256"], row["source_path"])
        storage.put_bytes(row["key"], data)
    return pd.DataFrame(rows)[["key", "sha256", "source_path", "label", "split"]]


def classes_of(prob) -> np.ndarray:
    return np.where(np.asarray(prob) >= 0.5, "male", "female")


def good_probs(rows: pd.DataFrame, accuracy: float, seed: int) -> np.ndarray:
    """P(male), right for about `accuracy` of the images, confident but never 0 or 1."""
    rng = np.random.default_rng(seed)
    y = encode_labels(rows["label"])
    right = rng.random(len(rows)) < accuracy
    conf = rng.uniform(0.6, 0.95, len(rows))
    return np.where(right == (y == 1), conf, 1 - conf)


def one_class_probs(rows: pd.DataFrame, seed: int) -> np.ndarray:
    """A collapsed model: every image female, though its scores still rank."""
    y = encode_labels(rows["label"])
    return np.clip(0.3 + 0.1 * y + np.random.default_rng(seed).normal(0, 0.05, len(rows)), 0.01, 0.49)


def _write_model(storage, run_key: str, name: str, rows: pd.DataFrame, prob, train_accuracy: float,
                 extra: dict | None = None, last_epoch: dict | None = None) -> pd.DataFrame:  # fmt: skip
    def put(file: str, data: bytes) -> None:
        storage.put_bytes(layout.model_file_key(run_key, name, file), data)

    prob = np.round(np.asarray(prob, dtype=float), 6)
    preds = rows[["key", "split", "label"]].assign(prob_male=prob, predicted=classes_of(prob))
    test, val = preds[preds.split == "test"], preds[preds.split == "val"]
    metrics = {"model": name, "train_accuracy": train_accuracy, "val_accuracy": float((val.label == val.predicted).mean()),
               "test": classification_metrics(encode_labels(test.label), test.prob_male.to_numpy()), **(extra or {})}  # fmt: skip
    put("predictions.csv", tables.to_csv(preds, index=False).encode())
    put("metrics.json", json.dumps(metrics, indent=1).encode())
    if name != ENSEMBLE:
        history = [{"epoch": e, "accuracy": train_accuracy - 0.1 / e, "val_accuracy": metrics["val_accuracy"],
                    "loss": 0.4 + 0.2 / e, "val_loss": 0.5 + 0.2 / e} for e in (1, 2, 3)]  # fmt: skip
        history[-1].update(last_epoch or {})
        put("history.json", json.dumps(history, indent=1).encode())
    return preds


def _trained(size: int) -> dict:
    return {"epochs": 3, "image_size": size, "freeze_epochs": 0, "weights": "none", "parameters": 12345,
            "train_seconds": 2.5, "mean_images_per_s": 120.0, "device": "cpu"}  # fmt: skip


def _write_repeat(storage, run_key: str, rows: pd.DataFrame, models, seed: int, ensemble: bool) -> None:
    probs = {}
    for i, name in enumerate(models):
        if name == FLAGGED:
            probs[name] = one_class_probs(rows, seed)
            _write_model(storage, run_key, name, rows, probs[name], 0.876, _trained(16))
        else:
            probs[name] = good_probs(rows, 0.9 - 0.05 * i, seed + i)
            _write_model(storage, run_key, name, rows, probs[name], 0.92 - 0.04 * i, _trained(16),
                         RECALIBRATED if name == "resnet50" else None)  # fmt: skip
    if ensemble:
        members = [m for m in models if m != FLAGGED]
        mean = np.mean([probs[m] for m in members], axis=0)
        train = rows.split == "train"
        train_acc = float((classes_of(mean[train]) == rows.label[train]).mean())
        excluded = {FLAGGED: ["one_class", "not_above_majority"]} if FLAGGED in models else {}
        _write_model(storage, run_key, ENSEMBLE, rows, mean, train_acc,
                     {"members": members, "weights": [1 / len(members)] * len(members), "excluded": excluded,
                      "flagged": excluded, "all_flagged": False})  # fmt: skip


def _write_attributes(storage, rows: pd.DataFrame) -> None:
    n = len(rows)
    table = pd.DataFrame({"sha256": rows["sha256"], "age": [("20-29", "30-39", "40-49")[i % 3] for i in range(n)],
                          "ethnicity": ["<i>a</i>" if i % 2 else "=1+1" for i in range(n)]})  # fmt: skip
    put_recorded(storage, layout.attributes_key(DATASET_ID), tables.to_csv(table, index=False).encode())


def _write_audit(storage, run_key: str, rows: pd.DataFrame) -> dict:
    """The label audit's table, the hostile-named images the most suspicious; returns the task's summary."""
    prob = np.round(good_probs(rows, 0.8, 99), 6)
    prob[0], prob[SIZES["train"] // 2] = 0.97, 0.02  # the female image called male, the male one female
    y = encode_labels(rows["label"])
    table = audit_table(rows, y, prob, np.arange(len(rows)) % 3)  # ranked as the audit ranks
    put_recorded(storage, layout.label_audit_key(run_key), tables.to_csv(table, index=False).encode())
    correct = (table["prob_male"] >= 0.5) == (table["label"] == "male")
    return {"audit_uri": storage.url(layout.label_audit_key(run_key)), "images": len(table), "folds": 3,
            "model": "cnn", "suspicious": int((table["p_given_label"] < 0.1).sum()),
            "out_of_fold_accuracy": float(correct.mean())}  # fmt: skip


def _write_external(storage, run_key: str, models) -> None:
    y = np.array([0] * 6 + [1] * 6)
    results = {}
    for i, name in enumerate(models):
        prob = good_probs(pd.DataFrame({"label": np.where(y == 1, "male", "female")}), 0.75 - 0.05 * i, 50 + i)
        metrics = classification_metrics(y, prob)
        metrics["ci"] = bootstrap_ci(y, (prob >= 0.5).astype(int), seed=0)
        results[name] = metrics
    out = {"name": EXTERNAL_SET, "source": "/data/<b>real</b>", "filter": "age >= 30", "images": len(y),
           "counts": {"female": 6, "male": 6}, "models": results}  # fmt: skip
    storage.put_bytes(layout.external_key(run_key, EXTERNAL_SET), json.dumps(out, indent=1).encode())


def write_run(storage, root: str, *, run_key: str = "run1", models=MODELS, repeats: int = 2, ensemble: bool = True,
              audit: bool = True, external: bool = True) -> dict:  # fmt: skip
    """A finished run in `storage` (whose location is `root`); returns build_report's keyword arguments."""
    settings = resolve_settings({"profile": "tiny", "models": list(models), "repeats": repeats, "storage": root,
                                 "source": "/data/<script>alert(1)</script>"})  # fmt: skip
    rows = _split_rows(storage)
    split_key = f"splits/{run_key}.csv"
    write_manifest(storage, split_key, rows)
    _write_attributes(storage, rows)
    for r in range(repeats):
        _write_repeat(storage, layout.repeat_run_key(run_key, r), rows, models, seed=10 * r, ensemble=ensemble)
    summary = _write_audit(storage, run_key, rows) if audit else None
    if external:
        _write_external(storage, run_key, [*models, *([ENSEMBLE] if ensemble else [])])
    validation = {"evaluated": 5, "success": False, "near_duplicate_distance": 4, "near_duplicate_count": 1,
                  "near_duplicates": [{"a": HOSTILE_PATH, "split_a": "train", "label_a": "female", "b": "female/x.png",
                                       "split_b": "test", "label_b": "male", "distance": 2}],
                  "failed": [{"says": "unique sha256", "detail": "2 duplicates", "examples": ["<b>dup</b>.png"]}]}  # fmt: skip
    return {"run_key": run_key, "settings": settings, "dataset": {"dataset_id": DATASET_ID, "images": len(rows)},
            "validation": validation, "split_key": split_key, "task_durations": {"train_cnn": 2.5, "report": 0.4},
            "run_id": HOSTILE_RUN_ID, "label_audit": summary, "repeat_split_keys": [split_key] * repeats}  # fmt: skip
