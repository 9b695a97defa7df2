"""Uncertainty for the comparison: bootstrap confidence intervals and McNemar's paired test.

With about a thousand test images a one-point difference in accuracy can be noise; these say
which differences are not.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import binomtest


def _weighted_f1_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, support: np.ndarray) -> np.ndarray:
    """Weighted F1 over classes; arrays are (B, classes)."""
    denom = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp, dtype=float), where=denom > 0)
    total = support.sum(axis=1, keepdims=True)
    return (f1 * np.divide(support, total, out=np.zeros_like(f1), where=total > 0)).sum(axis=1)


def bootstrap_ci(y_true, y_pred, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """Percentile bootstrap (resampling test images) for accuracy and weighted F1."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    n = len(y_true)
    if n == 0:
        return {"accuracy": [None, None], "f1": [None, None]}
    # Labels and predictions are 0/1, so a resample is fully described by its counts of the four
    # (true, predicted) cells: drawing those counts (multinomial) is the same bootstrap as drawing n
    # image indices, in memory and time that do not grow with the test set (2,000 x n indices would
    # take gigabytes at a 150,000-image test set).
    cells = np.array([[((y_true == t) & (y_pred == p)).sum() for p in (0, 1)] for t in (0, 1)]).ravel()
    counts = np.random.default_rng(seed).multinomial(n, cells / n, size=n_boot).reshape(n_boot, 2, 2)
    acc = (counts[:, 0, 0] + counts[:, 1, 1]) / n
    tp = np.stack([counts[:, c, c] for c in (0, 1)], 1)
    fp = np.stack([counts[:, 1 - c, c] for c in (0, 1)], 1)
    fn = np.stack([counts[:, c, 1 - c] for c in (0, 1)], 1)
    support = counts.sum(axis=2)
    f1 = _weighted_f1_from_counts(tp, fp, fn, support)
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {
        "accuracy": [float(np.percentile(acc, lo)), float(np.percentile(acc, hi))],
        "f1": [float(np.percentile(f1, lo)), float(np.percentile(f1, hi))],
    }


def mcnemar(y_true, pred_a, pred_b) -> dict:
    """Exact McNemar test on the images where exactly one of two models is right."""
    y_true, pred_a, pred_b = map(np.asarray, (y_true, pred_a, pred_b))
    a_right, b_right = pred_a == y_true, pred_b == y_true
    only_a, only_b = int((a_right & ~b_right).sum()), int((~a_right & b_right).sum())
    n = only_a + only_b
    p = 1.0 if n == 0 else float(binomtest(min(only_a, only_b), n, 0.5).pvalue)
    return {"only_a_right": only_a, "only_b_right": only_b, "p_value": p}
