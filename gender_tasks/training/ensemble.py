"""The ensemble of a run's trained models: the mean of their P(male), evaluated and exported like a model.

    runs/<run_key>/models/ensemble/predictions.csv   every image's mean P(male), with its split
    runs/<run_key>/models/ensemble/metrics.json      test metrics, train / validation accuracy, members
    runs/<run_key>/models/ensemble/model.ts          TorchScript: the members' exported modules in one, each
                                                     fed the input resized to its own size
    runs/<run_key>/models/ensemble/model_card.json   written last: the card, with the sha256 of each file above

No training: it reads the members' predictions.csv and model.ts, each verified first against the
sha256 its member's model card records (an IntegrityError naming the file if one changed). The
exported module takes images at the largest member size (its meta.json says so, as every model.ts does) and resizes them (bilinear,
antialiased) for the smaller members, so `predict` and the external sets use it like any model.
"""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .. import layout, tables
from ..evaluation.metrics import classification_metrics, encode_labels
from ..evaluation.predict import MODEL_CARD, load_stored_model, stored_checksums
from ..integrity import sha256_hex
from ..settings import CLASSES, ENSEMBLE, Settings
from ..storage import Storage, read_verified

log = logging.getLogger(__name__)


class _Ensemble(torch.nn.Module):
    """Mean P(male) of exported member modules; the input is resized to each member's size."""

    def __init__(self, members: list[torch.nn.Module], sizes: list[int], input_size: int):
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.sizes = sizes
        self.resize = [size != input_size for size in sizes]  # decided here, so the trace holds no shape test

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for member, size, resize in zip(self.members, self.sizes, self.resize, strict=True):
            xi = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True) \
                if resize else x  # fmt: skip
            total = total + member(xi)
        return total / len(self.sizes)


def _mean_predictions(storage: Storage, run_key: str, models: tuple[str, ...]) -> pd.DataFrame:
    """key, split, label, prob_male (the members' mean), predicted: one row per image all members scored."""
    merged = None
    for name in models:
        prefix = layout.model_prefix(run_key, name)
        sha = stored_checksums(storage, prefix, ["predictions.csv"])["predictions.csv"]
        table = tables.read_csv(
            io.BytesIO(read_verified(storage, f"{prefix}/predictions.csv", sha)), keep_default_na=False
        )
        table = table[["key", "split", "label", "prob_male"]].rename(columns={"prob_male": name})
        merged = table if merged is None else merged.merge(table, on=["key", "split", "label"], how="inner")
    merged["prob_male"] = merged[list(models)].mean(axis=1)
    merged["predicted"] = np.where(merged["prob_male"] >= 0.5, "male", "female")
    return merged[["key", "split", "label", "prob_male", "predicted"]]


def _accuracy(preds: pd.DataFrame, split: str) -> float | None:
    part = preds[preds["split"] == split]
    return float((part["label"] == part["predicted"]).mean()) if len(part) else None


def export_ensemble(storage: Storage, run_key: str, models: tuple[str, ...], card: dict) -> bytes:
    """One TorchScript module over the members' model.ts; meta.json: the largest member size as input."""
    members, sizes = [], []
    for name in models:
        module, meta = load_stored_model(storage, layout.model_prefix(run_key, name))
        members.append(module)
        sizes.append(int(meta["image_size"]))
    size = max(sizes)
    wrapper = _Ensemble(members, sizes, size).eval()
    with torch.inference_mode():
        scripted = torch.jit.trace(wrapper, torch.rand(2, 3, size, size), check_trace=False)
    meta = {"model": ENSEMBLE, "members": list(models), "member_sizes": sizes, "image_size": size,
            "classes": list(CLASSES), "input": "float32 NCHW RGB in [0, 1]", "output": "P(male)", **card}  # fmt: skip
    buf = io.BytesIO()
    torch.jit.save(scripted, buf, _extra_files={"meta.json": json.dumps(meta, default=str)})
    return buf.getvalue()


def build_ensemble(storage: Storage, *, run_key: str, settings: Settings) -> dict:
    """Write the ensemble of the run's models (at least two); returns a small summary (XCom-safe)."""
    models = tuple(settings.models)
    if len(models) < 2:
        return {"skipped": "an ensemble needs at least two models"}
    preds = _mean_predictions(storage, run_key, models)
    test = preds[preds["split"] == "test"]
    test_metrics = classification_metrics(encode_labels(test["label"]), test["prob_male"].to_numpy()) if len(test) \
        else None  # fmt: skip
    metrics = {"model": ENSEMBLE, "members": list(models), "test": test_metrics,
               # Unlike the members' (running accuracy on augmented batches): the mean prediction on the
               # un-augmented training images.
               "train_accuracy": _accuracy(preds, "train"), "val_accuracy": _accuracy(preds, "val"),
               "seed": settings.seed}  # fmt: skip
    card = {"source": settings.source, "seed": settings.seed, "profile": settings.profile, "test_metrics": test_metrics}

    def key(name: str) -> str:
        return layout.model_file_key(run_key, ENSEMBLE, name)

    files = {"predictions.csv": tables.to_csv(preds, index=False).encode(),
             "metrics.json": json.dumps(metrics, indent=1).encode(),
             "model.ts": export_ensemble(storage, run_key, models, card)}  # fmt: skip
    for name, data in files.items():
        storage.put_bytes(key(name), data)
    # Written last, as a trained model's: the ensemble is complete, and its files are verified on read.
    checksums = {name: sha256_hex(data) for name, data in files.items()}
    storage.put_bytes(key(MODEL_CARD), json.dumps({**metrics, **card, "files": checksums}, indent=1).encode())
    accuracy = test_metrics["accuracy"] if test_metrics else None
    log.info("ensemble of %s: test accuracy %s", ", ".join(models), accuracy)
    return {"model": ENSEMBLE, "run_key": run_key, "test_accuracy": accuracy,
            "model_uri": storage.url(key("model.ts"))}  # fmt: skip
