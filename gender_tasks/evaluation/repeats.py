"""Statistics over repeated runs (several seeds or splits of the same experiment); pure numpy/scipy.

Owns: the corrected resampled t-test of Nadeau and Bengio (2003) for the difference of two models
over J repeats of a random train/test split, the per-model summary of each metric over repeats
(mean, sample std, range, 95% t-interval of the mean), how often each model ranks first, and the
corrected test for every pair of models.

`per_repeat` everywhere is a list with one entry per repeat: {model name: {metric name: value}}.
Non-numeric metric values (None, nested dicts, strings) are ignored; a model missing from a repeat
simply contributes nothing to that repeat.
"""

from __future__ import annotations

import math
from itertools import combinations
from numbers import Real

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


def corrected_resampled_ttest(diffs, n_train: int, n_test: int) -> dict:
    """Nadeau & Bengio's corrected resampled t-test of the mean of per-repeat differences `diffs`.

    t = mean(d) / sqrt((1/J + n_test/n_train) * var(d, ddof=1)) with J - 1 degrees of freedom,
    p two-sided. The n_test/n_train term corrects for the overlap of training sets between repeats,
    which makes the plain paired t-test far too liberal.

    Edge cases (documented, never an exception for J >= 1):
      * J = 1: no variance can be estimated; t and p are NaN, df 0.
      * zero variance (every difference equal, up to floating-point rounding: 0.9 - 0.8 and
        0.8 - 0.7 differ in the last bits): a mean of 0 gives t = 0, p = 1; any other mean gives
        t = +-inf, p = 0 (the differences are all the same sign and size). std is then 0.
    Returns {"t", "p", "df", "mean", "std", "n"}.
    """
    d = np.asarray(diffs, dtype=float)
    if d.ndim != 1 or len(d) == 0:
        raise ValueError("diffs must be a non-empty 1-D sequence")
    if n_train <= 0 or n_test <= 0:
        raise ValueError(f"n_train and n_test must be positive, got {n_train} and {n_test}")
    j, mean = len(d), float(d.mean())
    if j == 1:
        return {"t": math.nan, "p": math.nan, "df": 0, "mean": mean, "std": math.nan, "n": 1}
    out = {"df": j - 1, "mean": mean, "n": j}
    if np.allclose(d, d[0], rtol=1e-12, atol=1e-15):
        zero = abs(mean) <= 1e-15
        return {**out, "std": 0.0, "t": 0.0 if zero else math.copysign(math.inf, mean), "p": 1.0 if zero else 0.0}
    var = float(d.var(ddof=1))
    out["std"] = math.sqrt(var)
    t = mean / math.sqrt((1.0 / j + n_test / n_train) * var)
    return {**out, "t": t, "p": float(2 * stats.t.sf(abs(t), j - 1))}


def t_interval(values, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The t-interval of the mean of `values` (NaN bounds for fewer than two values)."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return math.nan, math.nan
    half = stats.t.ppf(0.5 + confidence / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return float(v.mean() - half), float(v.mean() + half)


def _describe(values: list[float]) -> dict:
    v = np.asarray(values, dtype=float)
    low, high = t_interval(v)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else math.nan,
            "min": float(v.min()), "max": float(v.max()), "n": len(v), "ci_low": low, "ci_high": high}  # fmt: skip


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def collect(per_repeat: list[dict]) -> dict[str, dict[str, list[float]]]:
    """{model: {metric: [value per repeat that has it]}}, numeric metrics only."""
    out: dict[str, dict[str, list[float]]] = {}
    for repeat in per_repeat:
        for model, metrics in repeat.items():
            for name, value in metrics.items():
                if _is_number(value):
                    out.setdefault(model, {}).setdefault(name, []).append(float(value))
    return out


def summarise_repeats(per_repeat: list[dict]) -> dict:
    """{model: {metric: {mean, std (ddof=1), min, max, n, ci_low, ci_high}}}: the 95% t-interval of
    the mean; std and the interval are NaN for a metric seen in one repeat only."""
    return {model: {name: _describe(vals) for name, vals in metrics.items()}
            for model, metrics in collect(per_repeat).items()}  # fmt: skip


def rank_first_counts(per_repeat: list[dict], metric: str = "test_accuracy", ties: str = "split") -> dict[str, float]:
    """How often each model has the highest `metric` in a repeat (models without it there are skipped).

    ties="split": k models tied for first get 1/k each, so the counts sum to the number of repeats;
    ties="each": every tied model gets 1 (counts may sum to more than the repeats).
    Every model seen in any repeat appears, with 0 if it never ranked first.
    """
    if ties not in ("split", "each"):
        raise ValueError(f"ties must be 'split' or 'each', got {ties!r}")
    counts = {model: 0.0 for repeat in per_repeat for model in repeat}
    for repeat in per_repeat:
        scores = {m: float(v[metric]) for m, v in repeat.items() if _is_number(v.get(metric))}
        if not scores:
            continue
        best = max(scores.values())
        winners = [m for m, s in scores.items() if s == best]
        for m in winners:
            counts[m] += 1.0 / len(winners) if ties == "split" else 1.0
    return counts


def paired_differences(per_repeat: list[dict], a: str, b: str, metric: str) -> list[float]:
    """metric(a) - metric(b) for every repeat in which both models have the metric."""
    return [float(r[a][metric]) - float(r[b][metric]) for r in per_repeat
            if _is_number(r.get(a, {}).get(metric)) and _is_number(r.get(b, {}).get(metric))]  # fmt: skip


def pairwise_corrected_tests(per_repeat: list[dict], n_train: int, n_test: int,
                             metric: str = "test_accuracy") -> list[dict]:  # fmt: skip
    """The corrected resampled t-test of `metric` for every pair of models (a before b in first-seen
    order; mean is a - b), over the repeats both appear in; pairs with no common repeat are left out."""
    models = list(dict.fromkeys(m for r in per_repeat for m in r))
    rows = []
    for a, b in combinations(models, 2):
        diffs = paired_differences(per_repeat, a, b, metric)
        if diffs:
            rows.append({"a": a, "b": b, "metric": metric, **corrected_resampled_ttest(diffs, n_train, n_test)})
    return rows
