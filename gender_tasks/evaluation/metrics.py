"""Classification metrics as data (dicts of plain floats), computed with scikit-learn.

Label encoding follows the study's Keras loader (classes sorted by name): female = 0, male = 1.
"""

from __future__ import annotations

import numpy as np

from ..settings import CLASSES


def encode_labels(labels) -> np.ndarray:
    return np.asarray([CLASSES.index(lbl) for lbl in labels], dtype=np.int64)


def classification_metrics(y_true: np.ndarray, prob_male: np.ndarray, threshold: float = 0.5) -> dict:
    # Imported here: scikit-learn (with scipy) takes 1.7 s to import, and a training process that only trains
    # (bench/gpu_check.py's jobs, bench/train_bench.py) reaches this module through encode_labels.
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score

    y_true = np.asarray(y_true)
    y_pred = (np.asarray(prob_male) >= threshold).astype(np.int64)
    out: dict = {"n": int(len(y_true)), "accuracy": float(accuracy_score(y_true, y_pred))}
    for avg in ("weighted", "macro"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=[0, 1], average=avg, zero_division=0)
        out[avg] = {"precision": float(p), "recall": float(r), "f1": float(f)}
    _, per_recall, _, support = precision_recall_fscore_support(
        y_true, y_pred, labels=[0, 1], average=None, zero_division=0
    )
    out["per_class_recall"] = {c: float(v) for c, v in zip(CLASSES, per_recall, strict=True)}
    out["support"] = {c: int(v) for c, v in zip(CLASSES, support, strict=True)}
    out["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=[0, 1]).tolist()
    out["roc_auc"] = float(roc_auc_score(y_true, prob_male)) if len(set(y_true.tolist())) == 2 else None
    return out
