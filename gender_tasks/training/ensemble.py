"""The ensemble of a run's trained models: a weighted mean of their P(male), evaluated and exported like a model.

Its members and weights are chosen on the validation split only (choose_members): models the health checks
flag (evaluation.health: one class, chance level, a train/validation gap) are left out, then of every
weighting of the rest in steps of 0.05, the one with the lowest validation log-loss among those at least as
accurate on validation as the best single model (select_members), so the ensemble is never worse there than
its best member. The test split plays no part in the choice.

    runs/<run_key>/models/ensemble/predictions.csv   every image's weighted mean P(male), with its split
    runs/<run_key>/models/ensemble/metrics.json      test metrics, train / validation accuracy, members and
                                                     weights, how they were chosen (selection)
    runs/<run_key>/models/ensemble/model.pt2         torch.export: the members' exported programs in one, each
                                                     fed the images decoded at its own size
    runs/<run_key>/models/ensemble/model_card.json   written last: the card, with the sha256 of each file above

No training: it reads the members' predictions.csv and model.pt2, each verified first against the
sha256 its member's model card records (an IntegrityError naming the file if one changed). The
exported program computes what the report scored: each member on the image decoded at that member's own
input size (decode_resize, as training's cache decodes it), then the weighted mean. So it takes one input
per distinct member size (meta.json `input_sizes`, ascending; `member_sizes` per member), and `predict`,
scoring and the external sets feed it each image decoded at every one of those sizes, as for any model.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from .. import layout, tables
from ..evaluation.health import check_predictions
from ..evaluation.metrics import classification_metrics, encode_labels
from ..evaluation.predict import MODEL_CARD, load_stored_model, stored_checksums
from ..integrity import sha256_hex
from ..settings import CLASSES, ENSEMBLE, Settings
from ..storage import Storage, read_verified
from .export import INPUT, save_program

log = logging.getLogger(__name__)


class _Ensemble(torch.nn.Module):
    """Weighted mean P(male) of exported member modules (weights summing to 1); input i is the images at
    input size i, and each member reads the input of its own size (no resizing inside: each was decoded at
    that size)."""

    def __init__(self, members: list[torch.nn.Module], inputs: list[int], weights: list[float]):
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.inputs = inputs  # the index of the input each member reads
        self.weights = [float(w) for w in weights]

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(xs[0].shape[0], dtype=xs[0].dtype, device=xs[0].device)
        for member, i, w in zip(self.members, self.inputs, self.weights, strict=True):
            total = total + w * member(xs[i])
        return total


def _member_file(storage: Storage, run_key: str, name: str, file: str) -> bytes:
    """A member's file, checked against the sha256 its model card recorded (an IntegrityError if it changed)."""
    prefix = layout.model_prefix(run_key, name)
    return read_verified(storage, f"{prefix}/{file}", stored_checksums(storage, prefix, [file])[file])


def _mean_predictions(
    storage: Storage, run_key: str, models: tuple[str, ...], weights: Sequence[float]
) -> pd.DataFrame:
    """key, split, label, prob_male (the members' weighted mean), predicted: one row per image all members
    scored."""
    merged = None
    for name in models:
        table = tables.read_csv(
            io.BytesIO(_member_file(storage, run_key, name, "predictions.csv")), keep_default_na=False
        )
        table = table[["key", "split", "label", "prob_male"]].rename(columns={"prob_male": name})
        merged = table if merged is None else merged.merge(table, on=["key", "split", "label"], how="inner")
    merged["prob_male"] = merged[list(models)].to_numpy(dtype=float) @ np.asarray(weights, dtype=float)
    merged["predicted"] = np.where(merged["prob_male"] >= 0.5, "male", "female")
    return merged[["key", "split", "label", "prob_male", "predicted"]]


def _accuracy(preds: pd.DataFrame, split: str) -> float | None:
    part = preds[preds["split"] == split]
    return float((part["label"] == part["predicted"]).mean()) if len(part) else None


GRID = 20  # the ensemble's weights are multiples of 1 / GRID (0.05)


def _compositions(total: int, parts: int):
    """Every tuple of `parts` non-negative integers summing to `total`, the first part largest first."""
    if parts == 1:
        yield (total,)
        return
    for first in range(total, -1, -1):
        for rest in _compositions(total - first, parts - 1):
            yield (first, *rest)


def weightings(candidates: int) -> np.ndarray:
    """Every weighting of `candidates` models in multiples of 1 / GRID that sums to 1: an (n, candidates)
    array (4 candidates: 1,771 rows), in a fixed order."""
    return np.array(list(_compositions(GRID, candidates)), dtype=float) / GRID


def _scores(y: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validation accuracy and log-loss of the weighted mean P(male) under each row of `weights`; the
    log-loss is sklearn.metrics.log_loss's (probabilities clipped to [eps, 1 - eps], float64 eps), computed
    for all rows at once (one logarithm an image and weighting: of P(male) for the male images, of
    P(female) for the others), a block of rows at a time so memory stays bounded on a large validation split."""
    eps = np.finfo(float).eps
    male = y == 1
    accuracy, loss = np.empty(len(weights)), np.empty(len(weights))
    block = max(1, 4_000_000 // max(1, len(y)))
    for start in range(0, len(weights), block):
        w = weights[start : start + block].T
        on_male, on_female = probs[male] @ w, probs[~male] @ w  # P(male) of each image under each weighting
        accuracy[start : start + block] = ((on_male >= 0.5).sum(axis=0) + (on_female < 0.5).sum(axis=0)) / len(y)
        loss[start : start + block] = -(np.log(np.clip(on_male, eps, 1 - eps)).sum(axis=0)
                                        + np.log1p(-np.clip(on_female, eps, 1 - eps)).sum(axis=0)) / len(y)  # fmt: skip
    return accuracy, loss


def select_members(labels, val_probs: dict[str, np.ndarray]) -> dict:
    """The ensemble's members and weights, chosen on validation data only.

    `labels` (0/1) and each candidate's P(male) are the validation images', in the same order; nothing
    else is seen, so the test split cannot steer the choice. Every weighting of the candidates in steps
    of 1/GRID (0.05) is scored on validation (the weighted mean's accuracy and log-loss); of those whose
    accuracy is not below the best single candidate's, the one with the lowest log-loss wins (ties: fewer
    members, then the earlier weighting). Each single candidate is itself a weighting, so the chosen mean is
    never worse on validation than its best member, in accuracy or in log-loss. Members are the candidates
    with a weight above 0, the heaviest first.

    Why this rule (bench/RESULTS.md, "Ensemble weights chosen by validation log-loss"): replayed on the
    stored validation and held-out probabilities of 102 bench/heldout.py runs, its ensembles scored +0.005
    (paired t 4.4; 51 runs better, 22 worse) on the faces the runs never saw against greedy forward selection
    of equal-weight members, the rule before it.

    Returns {"members", "weights", "val_accuracy", "val_log_loss", "best_single": {"model", "val_accuracy",
    "val_log_loss"}, "weightings": how many were scored, "as_accurate": how many kept the best single
    candidate's accuracy}."""
    y = np.asarray(labels, dtype=int)
    if not val_probs:
        raise ValueError("select_members needs at least one candidate")
    if len(y) == 0:
        raise ValueError("select_members needs validation images: the split has none")
    names = list(val_probs)
    probs = np.column_stack([np.asarray(val_probs[n], dtype=float) for n in names])
    weights = weightings(len(names))
    accuracy, loss = _scores(y, probs, weights)
    single = np.flatnonzero(weights.max(axis=1) == 1.0)  # each candidate alone
    best = single[np.lexsort((single, loss[single], -accuracy[single]))[0]]  # accuracy, then log-loss, then order
    as_accurate = np.flatnonzero(accuracy >= accuracy[best])
    size = (weights[as_accurate] > 0).sum(axis=1)
    chosen = as_accurate[np.lexsort((as_accurate, size, loss[as_accurate]))[0]]
    order = sorted((i for i in range(len(names)) if weights[chosen, i] > 0), key=lambda i: (-weights[chosen, i], i))
    return {"members": [names[i] for i in order], "weights": [float(weights[chosen, i]) for i in order],
            "val_accuracy": float(accuracy[chosen]), "val_log_loss": float(loss[chosen]),
            "best_single": {"model": names[int(weights[best].argmax())], "val_accuracy": float(accuracy[best]),
                            "val_log_loss": float(loss[best])},
            "weightings": len(weights), "as_accurate": len(as_accurate)}  # fmt: skip


def choose_members(storage: Storage, run_key: str, models: tuple[str, ...]) -> dict:
    """Leave out the models the health checks flag (evaluation.health), then pick the members among the
    rest on the validation split (select_members). When every model is flagged they cannot all be left out:
    the choice is made among those that did not collapse to one class (all of them if every one did),
    `all_flagged` says so (the report warns) and `excluded` names the collapsed ones left out.

    Returns select_members' answer plus {"flagged": {model: [checks]}, "excluded": {model: [checks]},
    "all_flagged"}."""
    val, flagged = {}, {}
    for name in models:
        preds = tables.read_csv(
            io.BytesIO(_member_file(storage, run_key, name, "predictions.csv")), keep_default_na=False
        )
        metrics = json.loads(_member_file(storage, run_key, name, "metrics.json"))
        findings = check_predictions(preds, metrics.get("train_accuracy"), model=name)
        if findings:
            flagged[name] = [f["check"] for f in findings]
        val[name] = preds[preds["split"] == "val"].set_index("key")[["label", "prob_male"]]
    all_flagged = len(flagged) == len(models)
    excluded = _collapsed_unless_all(flagged, models) if all_flagged else flagged
    candidates = [m for m in models if m not in excluded]
    keys = sorted(set.intersection(*(set(val[m].index) for m in candidates)))
    labels = encode_labels(val[candidates[0]].loc[keys, "label"])
    chosen = select_members(labels, {m: val[m].loc[keys, "prob_male"].to_numpy() for m in candidates})
    if excluded:
        log.warning("ensemble: left out %s (flagged: %s)", ", ".join(excluded),
                    "; ".join(f"{m} {', '.join(c)}" for m, c in excluded.items()))  # fmt: skip
    if all_flagged:
        log.warning("ensemble: every model is flagged (%s), so it is chosen among %s",
                    "; ".join(f"{m} {', '.join(c)}" for m, c in flagged.items()),
                    "the ones that did not collapse" if excluded else "all of them")  # fmt: skip
    return {**chosen, "flagged": flagged, "excluded": excluded, "all_flagged": all_flagged}


def _collapsed_unless_all(flagged: dict[str, list[str]], models: tuple[str, ...]) -> dict[str, list[str]]:
    """When every model is flagged: the ones that called (nearly) every validation image one class, unless
    all did. A constant can only pull the mean toward its class, yet on an imbalanced validation split a
    choice made there takes it (the larger class being the likelier; tests/test_health.py shows select_members
    doing so): on 560 female / 147 male real photos a collapsed ResNet50 joined the ensemble (under the
    earlier greedy rule), which fell from the CNN's 0.78 to 0.72 on balanced unseen faces. The models flagged
    only for accuracy not clearly above the majority rate, or a train/validation gap, stay candidates: with
    few images of the smaller class that test rarely passes."""
    collapsed = {m: checks for m, checks in flagged.items() if "one_class" in checks}
    return collapsed if len(collapsed) < len(models) else {}


def export_ensemble(storage: Storage, run_key: str, models: tuple[str, ...], card: dict,
                    weights: Sequence[float] | None = None) -> bytes:  # fmt: skip
    """One torch.export program over the members' model.pt2 (their weighted mean, `weights` summing to 1;
    None: equal weights): one input per distinct member size."""
    weights = [1 / len(models)] * len(models) if weights is None else [float(w) for w in weights]
    if len(weights) != len(models) or abs(sum(weights) - 1) > 1e-9 or min(weights) < 0:
        raise ValueError(
            f"ensemble weights {weights} for {list(models)}: need one non-negative weight a member, summing to 1"
        )
    members, sizes = [], []
    for name in models:
        module, meta = load_stored_model(storage, layout.model_prefix(run_key, name))
        if len(meta["input_sizes"]) != 1:
            raise ValueError(f"ensemble member {name} takes {len(meta['input_sizes'])} inputs, not one")
        members.append(module)
        sizes.append(meta["input_sizes"][0])
    input_sizes = sorted(set(sizes))
    wrapper = _Ensemble(members, [input_sizes.index(s) for s in sizes], weights)
    meta = {"model": ENSEMBLE, "members": list(models), "weights": weights, "member_sizes": sizes,
            "input_sizes": input_sizes, "image_size": max(sizes), "classes": list(CLASSES), "input": INPUT,
            "output": "P(male): the members' weighted mean", **card}  # fmt: skip
    return save_program(wrapper, input_sizes, meta)


def build_ensemble(storage: Storage, *, run_key: str, settings: Settings) -> dict:
    """Write the ensemble of the run's models (at least two); returns a small summary (XCom-safe)."""
    if len(settings.models) < 2:
        return {"skipped": "an ensemble needs at least two models"}
    choice = choose_members(storage, run_key, tuple(settings.models))
    models = tuple(choice["members"])
    preds = _mean_predictions(storage, run_key, models, choice["weights"])
    test = preds[preds["split"] == "test"]
    test_metrics = classification_metrics(encode_labels(test["label"]), test["prob_male"].to_numpy()) if len(test) \
        else None  # fmt: skip
    metrics = {"model": ENSEMBLE, "members": list(models), "weights": choice["weights"],
               "flagged": choice["flagged"], "excluded": choice["excluded"], "all_flagged": choice["all_flagged"],
               "selection": {"best_single": choice["best_single"], "val_log_loss": choice["val_log_loss"],
                             "weightings": choice["weightings"], "as_accurate": choice["as_accurate"]},
               "test": test_metrics,
               # Unlike the members' (running accuracy on augmented batches): the weighted mean prediction on the
               # un-augmented training images.
               "train_accuracy": _accuracy(preds, "train"), "val_accuracy": _accuracy(preds, "val"),
               "seed": settings.seed}  # fmt: skip
    card = {"source": settings.source, "seed": settings.seed, "profile": settings.profile, "test_metrics": test_metrics}

    def key(name: str) -> str:
        return layout.model_file_key(run_key, ENSEMBLE, name)

    files = {"predictions.csv": tables.to_csv(preds, index=False).encode(),
             "metrics.json": json.dumps(metrics, indent=1).encode(),
             layout.MODEL_FILE: export_ensemble(storage, run_key, models, card, choice["weights"])}  # fmt: skip
    for name, data in files.items():
        storage.put_bytes(key(name), data)
    # Written last, as a trained model's: the ensemble is complete, and its files are verified on read.
    checksums = {name: sha256_hex(data) for name, data in files.items()}
    storage.put_bytes(key(MODEL_CARD), json.dumps({**metrics, **card, "files": checksums}, indent=1).encode())
    accuracy = test_metrics["accuracy"] if test_metrics else None
    log.info("ensemble of %s: test accuracy %s", ", ".join(f"{m} {w:.2f}" for m, w in zip(models, choice["weights"], strict=True)),
             accuracy)  # fmt: skip
    return {"model": ENSEMBLE, "run_key": run_key, "test_accuracy": accuracy, "members": list(models),
            "model_uri": storage.url(key(layout.MODEL_FILE))}  # fmt: skip
