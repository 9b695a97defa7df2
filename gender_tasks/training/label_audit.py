"""Label-quality audit: out-of-fold predictions for every image, ranked by how strongly they disagree
with the given label.

The study took its labels unverified. A model's predictions on images it trained on say nothing
about their labels, so every image is predicted by a model that never saw it: k-fold cross-fitting
over the whole dataset (stratified, seeded), with a fast model (the study's CNN by default).

    datasets/<id>/label_audit/<audit_key>.csv   key, source_path, label, split, fold, prob_male, p_given_label,
                                                label_quality
    runs/<run_key>/label_audit.csv              a copy of it; label_audit.json says which, and its inputs

Ranked by label quality: P(given label) less the model's mean confidence in that class over the
images that carry its label (cleanlab's self-confidence with adjusted probabilities; Northcutt et al.,
"Confident learning", 2021). A model less sure of one class (the smaller one, usually) would otherwise
fill the top of the list with that class's correctly labeled images.

Keyed like a trained model (training/keys.py): a run with the same dataset, split, settings and code
reuses the predictions instead of training the folds again.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from .. import layout, tables
from ..data.shards import ShardReader, memory_budget
from ..errors import PermanentError
from ..evaluation.metrics import encode_labels
from ..layout import audit_result_key, checksum_key, label_audit_key, label_audit_record_key
from ..settings import Settings
from ..storage import Storage, get_recorded, put_recorded
from .batches import rows_data
from .devices import configure_threads
from .keys import audit_inputs, key_of
from .loop import fit_predict

log = logging.getLogger(__name__)


def run_label_audit(storage: Storage, *, run_key: str, manifest: pd.DataFrame, dataset_id: str, settings: Settings,
                    parallel_tasks: int = 1) -> dict:  # fmt: skip
    inputs = audit_inputs(settings, dataset_id, manifest)
    audit_key = key_of(inputs)
    keyed = audit_result_key(dataset_id, audit_key)
    reused = storage.exists(keyed)
    if reused:
        log.info("label audit: reusing the predictions made with the same inputs, %s", storage.url(keyed))
        table = tables.read_csv(io.BytesIO(get_recorded(storage, keyed)))
    else:
        table = _audit(storage, manifest, dataset_id, settings, parallel_tasks,
                       fold_key=lambda k: layout.audit_fold_key(dataset_id, audit_key, k))  # fmt: skip
        put_recorded(storage, keyed, tables.to_csv(table, index=False).encode())
        for k in range(int(table["fold"].max()) + 1):  # the finished audit replaces its folds
            fold = layout.audit_fold_key(dataset_id, audit_key, k)
            storage.delete(fold)
            storage.delete(checksum_key(fold))
    if storage.exists(checksum_key(keyed)):  # an audit of an earlier version has none
        storage.copy(checksum_key(keyed), checksum_key(label_audit_key(run_key)))
    storage.copy(keyed, label_audit_key(run_key))
    record = {"audit": keyed, "audit_key": audit_key, "reused": reused, "inputs": inputs}
    storage.put_bytes(label_audit_record_key(run_key), json.dumps(record, indent=1).encode())
    return _summary(storage, run_key, table, settings.label_audit_model) | {"reused": reused}


def _summary(storage: Storage, run_key: str, table: pd.DataFrame, model_name: str) -> dict:
    suspicious = int((table["p_given_label"] < 0.1).sum())
    log.info("label audit: %d of %d images have P(given label) < 0.1", suspicious, len(table))
    correct = (table["prob_male"] >= 0.5) == (table["label"] == "male")
    return {"audit_uri": storage.url(label_audit_key(run_key)), "images": len(table),
            "folds": int(table["fold"].nunique()), "model": model_name, "suspicious": suspicious,
            "out_of_fold_accuracy": float(correct.mean())}  # fmt: skip


def _finished_fold(storage: Storage, key: str, shas: pd.Series) -> np.ndarray | None:
    """A fold's stored P(male), if an earlier (killed) try of the same audit finished it."""
    try:
        done = tables.read_csv(io.BytesIO(get_recorded(storage, key)))
    except FileNotFoundError:
        return None
    if done["sha256"].tolist() != shas.tolist():  # cannot happen for the same key; never trust it blindly
        log.warning("label audit: %s does not hold this fold's images; training the fold again", key)
        return None
    return done["prob_male"].to_numpy(dtype=np.float32)


def _audit(storage: Storage, manifest: pd.DataFrame, dataset_id: str, settings: Settings,
           parallel_tasks: int, fold_key: Callable[[int], str]) -> pd.DataFrame:  # fmt: skip
    """Out-of-fold P(male) for every distinct image, least plausible given label first.

    Each finished fold is stored (`fold_key(k)`), so that a killed audit resumes after it."""
    spec = settings.label_audit_spec
    model_name, folds, seed = settings.label_audit_model, int(settings.label_audit_folds), settings.seed
    configure_threads(parallel_tasks)
    rows = manifest.drop_duplicates("sha256").reset_index(drop=True)
    reader = ShardReader(storage, layout.cache_prefix(dataset_id, spec.image_size))
    # In memory if the dataset fits the budget twice (each fold copies its parts), else streamed.
    data = rows_data(rows, reader, stream=reader.nbytes(len(rows)) * 2 > memory_budget())
    y = encode_labels(rows["label"])
    folds = min(folds, int(np.bincount(y, minlength=2).min()))
    if folds < 2:
        raise PermanentError(
            "the label audit needs at least two images of each class; add images or switch the audit off "
            "(label_audit: false)"
        )
    prob = np.full(len(rows), np.nan, dtype=np.float32)
    fold_of = np.zeros(len(rows), dtype=np.int64)
    started = time.monotonic()
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (fit_idx, held_idx) in enumerate(splitter.split(np.zeros(len(y)), y)):
        fold_of[held_idx] = k
        shas = rows["sha256"].iloc[held_idx]
        done = _finished_fold(storage, fold_key(k), shas)
        if done is not None:
            prob[held_idx] = done
            log.info("label audit: fold %d/%d finished by an earlier try, resuming after it", k + 1, folds)
            continue
        prob[held_idx] = fit_predict(model_name, spec, settings, data.subset(fit_idx), data.subset(held_idx), seed + k)
        fold = pd.DataFrame({"sha256": shas.to_numpy(), "prob_male": prob[held_idx]})
        put_recorded(storage, fold_key(k), tables.to_csv(fold, index=False, float_format="%.9g").encode())
        log.info("label audit: fold %d/%d done (%.0fs)", k + 1, folds, time.monotonic() - started)
    return audit_table(rows, y, prob, fold_of)


def audit_table(rows: pd.DataFrame, y: np.ndarray, prob: np.ndarray, fold_of: np.ndarray) -> pd.DataFrame:
    """The audit's table: each image's fold and out-of-fold P(male), P(given label) and label quality,
    the least plausible label first."""
    table = rows[["key", "source_path", "label", "split"]].copy()
    table["fold"] = fold_of
    table["prob_male"] = prob
    table["p_given_label"] = np.where(y == 1, prob, 1 - prob)
    table["label_quality"] = label_quality(y, prob)
    return table.sort_values(["label_quality", "p_given_label"], kind="stable").reset_index(drop=True)


def label_quality(y: np.ndarray, prob_male: np.ndarray) -> np.ndarray:
    """How plausible each given label is, for ranking: P(given label) minus the class's confident threshold
    (the mean P(class) over the images labeled that class), shifted and scaled as cleanlab's adjusted
    self-confidence is (so that it lies in [0, 1]; the order is that of the difference).

    Written out here rather than adding cleanlab for one formula (its rank.get_label_quality_scores with
    method="self_confidence", adjust_pred_probs=True computes the same numbers)."""
    y = np.asarray(y, dtype=np.int64)
    probs = np.stack([1.0 - np.asarray(prob_male, dtype=np.float64), np.asarray(prob_male, dtype=np.float64)], axis=1)
    thresholds = np.array([probs[y == c, c].mean() if (y == c).any() else 0.0 for c in (0, 1)])
    adjusted = probs - thresholds + thresholds.max()
    adjusted /= adjusted.sum(axis=1, keepdims=True)
    return adjusted[np.arange(len(y)), y]
