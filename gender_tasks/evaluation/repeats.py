"""Statistics over repeated runs (several seeds or splits of the same experiment); pure numpy/scipy.

Owns: the corrected resampled t-test of Nadeau and Bengio (2003) for the difference of two models
over J repeats of a random train/test split, the per-model summary of each metric over repeats
(mean, sample std, range, 95% interval), how often each model ranks first, and the corrected test for
every pair of models.

Every metric summarised here (accuracy, precision, recall, F1, ROC AUC) lies in [0, 1], and so must its
interval: a plain t-interval over 2 repeats of [0.5, 1.0] is [-2.43, 3.93]. The interval is therefore a
t-interval on the logit scale, transformed back (logit_t_interval): inside (0, 1) by construction, and
honestly wide when the repeats are few (below 3 repeats it spans nearly all of [0, 1]; the report says
that such an interval means little).

`per_repeat` everywhere is a list with one entry per repeat: {model name: {metric name: value}}.
Non-numeric metric values (None, nested dicts, strings) are ignored; a model missing from a repeat
simply contributes nothing to that repeat.
"""

from __future__ import annotations

import math
from itertools import combinations
from numbers import Real

import numpy as np
from scipy import special, stats

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


def logit_t_interval(values, n_images: int | None = None, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The t-interval of the mean of proportions `values` (each in [0, 1]) on the logit scale, transformed
    back: it always lies inside [0, 1], and is asymmetric near the bounds (NaN for fewer than two values).

    A value of exactly 0 or 1 has no logit; it is moved half an image inside (to 0.5 / n_images or
    1 - 0.5 / n_images, the usual continuity correction), so `n_images` (the number of images each value
    was measured on) is required when one occurs; the interval then also holds the values' own mean. Values
    with no spread give [v, v]."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return math.nan, math.nan
    if np.any((v < 0) | (v > 1)):
        raise ValueError(f"logit_t_interval needs proportions in [0, 1], got {v.tolist()}")
    if np.allclose(v, v[0], rtol=0, atol=1e-15):
        return float(v[0]), float(v[0])
    if np.any((v == 0) | (v == 1)):
        if not n_images or n_images < 1:
            raise ValueError(f"values {v.tolist()} include 0 or 1: give n_images (the images each was measured on)")
        mean = float(v.mean())
        v = np.clip(v, 0.5 / n_images, 1 - 0.5 / n_images)
        low, high = t_interval(special.logit(v), confidence)
        # The correction moved values inward, and the interval with them: it is widened to hold the mean of
        # the values as measured (the mean the report prints beside it), never left below or above it.
        return min(float(special.expit(low)), mean), max(float(special.expit(high)), mean)
    low, high = t_interval(special.logit(v), confidence)
    return float(special.expit(low)), float(special.expit(high))


def _describe(values: list[float], n_images: int | None) -> dict:
    v = np.asarray(values, dtype=float)
    low, high = logit_t_interval(v, n_images)
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


def summarise_repeats(per_repeat: list[dict], n_images: int | None = None) -> dict:
    """{model: {metric: {mean, std (ddof=1), min, max, n, ci_low, ci_high}}}: the 95% interval is the
    t-interval on the logit scale (logit_t_interval; every metric must lie in [0, 1]; `n_images`, the test
    set's size, places a value of exactly 0 or 1). std and the interval are NaN for a metric seen in one
    repeat only."""
    return {model: {name: _describe(vals, n_images) for name, vals in metrics.items()}
            for model, metrics in collect(per_repeat).items()}  # fmt: skip


def rank_first_counts(per_repeat: list[dict], metric: str = "test_accuracy") -> dict:
    """In how many repeats each model has the highest `metric` (models without it there are skipped):
    whole counts, ties kept as ties.

    Returns {"alone": {model: repeats it was first on its own}, "tied": {model: repeats it shared first
    place}, "ties": [{"repeat": r, "models": [...]}, ...]}. Every model seen in any repeat appears in both
    counts (0 where it never ranked first); sum(alone) + len(ties) is the number of repeats with the metric."""
    models = list(dict.fromkeys(model for repeat in per_repeat for model in repeat))
    alone, tied, ties = dict.fromkeys(models, 0), dict.fromkeys(models, 0), []
    for r, repeat in enumerate(per_repeat):
        scores = {m: float(v[metric]) for m, v in repeat.items() if _is_number(v.get(metric))}
        if not scores:
            continue
        best = max(scores.values())
        winners = [m for m, s in scores.items() if s == best]
        if len(winners) == 1:
            alone[winners[0]] += 1
        else:
            ties.append({"repeat": r, "models": winners})
            for m in winners:
                tied[m] += 1
    return {"alone": alone, "tied": tied, "ties": ties}


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
