"""Checks that a trained model's numbers mean something, from its stored predictions alone (no training).

A model can look like an ordinary row in Table 1 and still be useless: on a small dataset MobileNetV2
reached 0.876 training accuracy yet called every validation and test image female. These checks read
a model's predictions.csv (key, split, label, prob_male, predicted) and its training accuracy, and say
what is wrong, with the numbers, so the report can warn, the ensemble can leave the model out, and the
training task can log it. Every check uses the validation split only; the test split stays unseen.

The rules (module constants, stated in the report):

* ``one_class``: a class gets under NEARLY_NONE (10 %) of its fair share of the validation predictions,
  i.e. its share of the predictions is below 0.1 x its share of the labels (under 5 % of the predictions
  on balanced data): the model puts (nearly) every image in one class.
* ``not_above_majority``: the validation accuracy is not significantly above the majority-class rate
  (always guessing the larger class): one-sided exact binomial test, p >= ALPHA (0.05), and its predictions
  are not significantly associated with the labels either (one-sided Fisher exact test on the 2x2 table of
  label and prediction, p >= ALPHA). The second test keeps a model that learned from being flagged on an
  imbalanced split, where beating the majority rate is not what it was trained for: weighted to count both
  classes alike (Recipe.class_weighting), models on 70 female / 20 male validation images reached balanced
  accuracy 0.66-0.84 (Fisher p 0.013 down to 3e-8) at accuracies of 0.63-0.84, which the binomial test cannot
  show above the majority rate 0.78 (bench/RESULTS.md, "Class weighting"). On balanced splits the two tests
  agree closely; a model that learned nothing (a constant, or chance) fails both.
* ``train_val_gap``: the training accuracy exceeds the validation accuracy by more than GAP_TOLERANCE
  (0.15) beyond what the split sizes explain: the one-sided (1 - ALPHA) lower confidence bound of
  train - val, from the two proportions' binomial standard errors (normal approximation, unpooled),
  is above 0.15. A modest generalisation gap is normal and not flagged; a gap that large is.
* ``no_validation``: no validation images, so nothing above could be checked.

Each finding is a plain dict {model, repeat, check, detail, numbers}, ready for results.json.
"""

from __future__ import annotations

import math

import pandas as pd
from scipy.stats import binom, binomtest, fisher_exact, norm

from ..settings import CLASSES

ALPHA = 0.05
NEARLY_NONE = 0.1
GAP_TOLERANCE = 0.15

BATCHNORM_CAUSE = (
    "BatchNorm running statistics lagging behind the weights after few optimizer steps: in training mode "
    "(batch statistics) the model separates the classes, in eval mode (running statistics) it does not"
)


def _finding(model: str, repeat: int | None, check: str, detail: str, numbers: dict) -> dict:
    return {"model": model, "repeat": repeat, "check": check, "detail": detail, "numbers": numbers}


def _accuracy(part: pd.DataFrame) -> float | None:
    return float((part["label"] == part["predicted"]).mean()) if len(part) else None


def check_predictions(predictions: pd.DataFrame, train_accuracy: float | None, *, model: str,
                      repeat: int | None = None) -> list[dict]:  # fmt: skip
    """Every check that fails for one model (an empty list: nothing found).

    `predictions` needs the columns split, label and predicted (class names); `train_accuracy` is the
    accuracy the model reports on its training split (None: the gap check is skipped)."""
    missing = {"split", "label", "predicted"} - set(predictions.columns)
    if missing:
        raise ValueError(
            f"predictions of {model} lack the column(s) {sorted(missing)}; expected split, label, predicted"
        )
    val = predictions[predictions["split"] == "val"]
    n = len(val)
    if n == 0:
        return [_finding(model, repeat, "no_validation", "no validation images: the model could not be checked", {})]
    val_accuracy = _accuracy(val)
    correct = int((val["label"] == val["predicted"]).sum())
    eval_train = _accuracy(predictions[predictions["split"] == "train"])
    base = {"n_val": n, "val_accuracy": val_accuracy, "train_accuracy": train_accuracy,
            "eval_train_accuracy": eval_train}  # fmt: skip
    out = []

    label_share = {c: float((val["label"] == c).mean()) for c in CLASSES}
    pred_share = {c: float((val["predicted"] == c).mean()) for c in CLASSES}
    starved = [c for c in CLASSES if label_share[c] > 0 and pred_share[c] < NEARLY_NONE * label_share[c]]
    if starved:
        c = starved[0]
        other = next(o for o in CLASSES if o != c)
        detail = (f"predicts {other} for {pred_share[other]:.0%} of the {n} validation images, "
                  f"{label_share[other]:.0%} of which are {other}")  # fmt: skip
        out.append(_finding(model, repeat, "one_class", detail, {**base, "predicted_share": pred_share,
                                                                  "label_share": label_share,
                                                                  "nearly_none": NEARLY_NONE}))  # fmt: skip

    majority = max(label_share.values())
    p = float(binomtest(correct, n, majority, alternative="greater").pvalue) if majority < 1 else 1.0
    association_p, balanced = association(val)
    if p >= ALPHA and association_p >= ALPHA:
        needed = correct_needed(n, majority)
        enough = (f"{needed} of {n} ({needed / n:.3f}) would have shown it" if needed is not None else
                  f"with {n} validation images not even all of them right would show it: too few to check")  # fmt: skip
        detail = (f"validation accuracy {val_accuracy:.3f} ({correct} of {n}) is not significantly above the "
                  f"majority-class rate {majority:.3f} (one-sided exact binomial test, p = {p:.3g} >= {ALPHA}; "
                  f"{enough}), and its predictions are not significantly associated with the labels either "
                  f"(balanced accuracy {balanced:.3f}; one-sided Fisher exact test, p = {association_p:.3g})")  # fmt: skip
        out.append(_finding(model, repeat, "not_above_majority", detail, {**base, "correct": correct,
                                                                           "majority_rate": majority, "p_value": p,
                                                                           "alpha": ALPHA, "correct_needed": needed,
                                                                           "balanced_accuracy": balanced,
                                                                           "association_p_value": association_p}))  # fmt: skip

    n_train = int((predictions["split"] == "train").sum())
    if train_accuracy is not None and n_train:
        gap = float(train_accuracy) - val_accuracy
        se = math.sqrt(train_accuracy * (1 - train_accuracy) / n_train + val_accuracy * (1 - val_accuracy) / n)
        lower = gap - float(norm.ppf(1 - ALPHA)) * se
        if lower > GAP_TOLERANCE:
            detail = (f"train accuracy {train_accuracy:.3f} ({n_train} images) exceeds validation accuracy "
                      f"{val_accuracy:.3f} ({n} images) by {gap:.3f}; even the {1 - ALPHA:.0%} lower bound "
                      f"{lower:.3f} is above the {GAP_TOLERANCE} tolerated")  # fmt: skip
            out.append(_finding(model, repeat, "train_val_gap", detail, {**base, "n_train": n_train, "gap": gap,
                                                                          "lower_bound": lower,
                                                                          "tolerance": GAP_TOLERANCE,
                                                                          "alpha": ALPHA}))  # fmt: skip
    return out


def association(val: pd.DataFrame) -> tuple[float, float]:
    """(p, balanced accuracy) of validation predictions: p of the one-sided Fisher exact test that predicting
    male goes with being male more than chance would make it (1.0 when a class is never given or never
    predicted: nothing to associate), and the mean of the two classes' recalls (0.5 for any constant)."""
    male, said = val["label"] == CLASSES[1], val["predicted"] == CLASSES[1]
    table = [
        [int((male & said).sum()), int((male & ~said).sum())],
        [int((~male & said).sum()), int((~male & ~said).sum())],
    ]
    recalls = [table[0][0] / max(sum(table[0]), 1), table[1][1] / max(sum(table[1]), 1)]
    balanced = float(sum(recalls) / 2) if all(sum(row) for row in table) else 0.5
    return float(fisher_exact(table, alternative="greater").pvalue), balanced


def correct_needed(n: int, majority: float, alpha: float = ALPHA) -> int | None:
    """The fewest right answers of `n` validation images that the one-sided exact binomial test finds
    significantly above the majority rate (P(X >= k) < alpha for X ~ Binomial(n, majority)), or None if even
    n of n is not: what a flagged model's warning tells the reader it lacked (on an imbalanced split, with
    few images of the smaller class, that can be nearly every image)."""
    if majority >= 1:
        return None
    k = int(binom.isf(alpha, n, majority)) + 1  # P(X > isf) <= alpha: k is at or just past the bound
    while k > 0 and binom.sf(k - 2, n, majority) < alpha:
        k -= 1
    while k <= n and binom.sf(k - 1, n, majority) >= alpha:
        k += 1
    return k if k <= n else None


def likely_cause(findings: list[dict]) -> str:
    """The most likely reason for one model's findings (one repeat), with what to do about it."""
    checks = {f["check"] for f in findings}
    if not checks:
        return ""
    if "no_validation" in checks:
        return "no validation images: give the dataset enough images for a validation split"
    nums = findings[0]["numbers"]
    train, val, eval_train = nums.get("train_accuracy"), nums["val_accuracy"], nums.get("eval_train_accuracy")
    learned = train is not None and train >= val + GAP_TOLERANCE
    # In eval mode the model fails on its own training images too: not overfitting, a train/eval mismatch.
    eval_mode_fails = eval_train is not None and learned and eval_train < train - GAP_TOLERANCE
    if learned and ("one_class" in checks or eval_mode_fails):
        seen = f" (eval-mode accuracy on its own training images {eval_train:.3f})" if eval_train is not None else ""
        return (f"{BATCHNORM_CAUSE}: training accuracy {train:.3f}, validation {val:.3f}{seen}. "
                "More data or more epochs (more optimizer steps) should fix it.")  # fmt: skip
    if "train_val_gap" in checks:
        return (f"overfitting: it fits its training images far better ({train:.3f}) than new ones ({val:.3f}); "
                "more data or stronger augmentation should help")  # fmt: skip
    if "one_class" in checks:
        return ("it did not learn to separate the classes"
                + (f" (training accuracy {train:.3f})" if train is not None else "")
                + ": too few images or epochs for this model, or labels that do not follow the faces")  # fmt: skip
    return (
        "its validation accuracy cannot be told apart from always guessing the larger class: too few "
        "validation images to tell, or the model did not learn; more data or more epochs should help"
    )


def flag_summary(findings: list[dict]) -> dict[str, dict]:
    """{model: {"repeats": [...], "checks": [...], "causes": [...]}} for every model with a finding."""
    out: dict[str, dict] = {}
    groups: dict[tuple, list[dict]] = {}
    for f in findings:
        groups.setdefault((f["model"], f["repeat"]), []).append(f)
    for (model, repeat), found in groups.items():
        entry = out.setdefault(model, {"repeats": [], "checks": [], "causes": []})
        entry["repeats"].append(repeat)
        entry["checks"] = list(dict.fromkeys([*entry["checks"], *(f["check"] for f in found)]))
        cause = likely_cause(found)
        if cause and cause not in entry["causes"]:
            entry["causes"].append(cause)
    return out
