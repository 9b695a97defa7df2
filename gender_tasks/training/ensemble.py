"""The ensemble of a run's trained models: the mean of their P(male), evaluated and exported like a model.

Its members are chosen on the validation split only (choose_members): models the health checks flag
(evaluation.health: one class, chance level, a train/validation gap) are left out, then greedy forward
selection keeps adding the model that most improves the mean on validation, so the ensemble is never
worse there than its best member. The test split plays no part in the choice.

    runs/<run_key>/models/ensemble/predictions.csv   every image's mean P(male), with its split
    runs/<run_key>/models/ensemble/metrics.json      test metrics, train / validation accuracy, members
    runs/<run_key>/models/ensemble/model.pt2         torch.export: the members' exported programs in one, each
                                                     fed the images decoded at its own size
    runs/<run_key>/models/ensemble/model_card.json   written last: the card, with the sha256 of each file above

No training: it reads the members' predictions.csv and model.pt2, each verified first against the
sha256 its member's model card records (an IntegrityError naming the file if one changed). The
exported program computes what the report scored: each member on the image decoded at that member's own
input size (decode_resize, as training's cache decodes it), then the plain mean. So it takes one input
per distinct member size (meta.json `input_sizes`, ascending; `member_sizes` per member), and `predict`,
scoring and the external sets feed it each image decoded at every one of those sizes, as for any model.
"""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import log_loss

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
    """Mean P(male) of exported member modules; input i is the images at input size i, and each member
    reads the input of its own size (no resizing inside: each was decoded at that size)."""

    def __init__(self, members: list[torch.nn.Module], inputs: list[int]):
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.inputs = inputs  # the index of the input each member reads

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(xs[0].shape[0], dtype=xs[0].dtype, device=xs[0].device)
        for member, i in zip(self.members, self.inputs, strict=True):
            total = total + member(xs[i])
        return total / len(self.inputs)


def _member_file(storage: Storage, run_key: str, name: str, file: str) -> bytes:
    """A member's file, checked against the sha256 its model card recorded (an IntegrityError if it changed)."""
    prefix = layout.model_prefix(run_key, name)
    return read_verified(storage, f"{prefix}/{file}", stored_checksums(storage, prefix, [file])[file])


def _mean_predictions(storage: Storage, run_key: str, models: tuple[str, ...]) -> pd.DataFrame:
    """key, split, label, prob_male (the members' mean), predicted: one row per image all members scored."""
    merged = None
    for name in models:
        table = tables.read_csv(
            io.BytesIO(_member_file(storage, run_key, name, "predictions.csv")), keep_default_na=False
        )
        table = table[["key", "split", "label", "prob_male"]].rename(columns={"prob_male": name})
        merged = table if merged is None else merged.merge(table, on=["key", "split", "label"], how="inner")
    merged["prob_male"] = merged[list(models)].mean(axis=1)
    merged["predicted"] = np.where(merged["prob_male"] >= 0.5, "male", "female")
    return merged[["key", "split", "label", "prob_male", "predicted"]]


def _accuracy(preds: pd.DataFrame, split: str) -> float | None:
    part = preds[preds["split"] == split]
    return float((part["label"] == part["predicted"]).mean()) if len(part) else None


def select_members(labels, val_probs: dict[str, np.ndarray]) -> dict:
    """The members of the ensemble, chosen on validation data only (greedy forward selection).

    `labels` (0/1) and each candidate's P(male) are the validation images', in the same order; nothing
    else is seen, so the test split cannot steer the choice. Start from the best single candidate
    (validation accuracy, then log-loss, then the order given), then add whichever candidate improves the
    plain mean's (accuracy, -log-loss) most, while one does. Each step must improve on the last, so the
    chosen mean is never worse on validation than its best member. Weights are equal (1 / members).

    Returns {"members", "weights", "val_accuracy", "val_log_loss", "steps"} (steps: the score after each
    added member)."""
    y = np.asarray(labels, dtype=int)
    if not val_probs:
        raise ValueError("select_members needs at least one candidate")
    if len(y) == 0:
        raise ValueError("select_members needs validation images: the split has none")

    def score(names: list[str]) -> tuple[float, float]:
        p = np.mean([np.asarray(val_probs[n], dtype=float) for n in names], axis=0)
        return float(((p >= 0.5) == y).mean()), float(log_loss(y, p, labels=[0, 1]))

    order = list(val_probs)
    chosen = [max(order, key=lambda n: (*_key(score([n])), -order.index(n)))]
    steps = [{"added": chosen[0], "val_accuracy": score(chosen)[0], "val_log_loss": score(chosen)[1]}]
    while True:
        rest = [n for n in order if n not in chosen]
        if not rest:
            break
        best = max(rest, key=lambda n: (*_key(score([*chosen, n])), -order.index(n)))
        if _key(score([*chosen, best])) <= _key(score(chosen)):
            break
        chosen.append(best)
        acc, loss = score(chosen)
        steps.append({"added": best, "val_accuracy": acc, "val_log_loss": loss})
    acc, loss = score(chosen)
    return {"members": chosen, "weights": [1 / len(chosen)] * len(chosen), "val_accuracy": acc,
            "val_log_loss": loss, "steps": steps}  # fmt: skip


def _key(score: tuple[float, float]) -> tuple[float, float]:
    """Higher is better: accuracy first, then the lower log-loss."""
    return score[0], -score[1]


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
    all did. A constant can only pull the mean toward its class, yet on an imbalanced validation split the
    greedy choice would take it (the larger class being the likelier): on 560 female / 147 male real photos
    a collapsed ResNet50 joined the ensemble, which fell from the CNN's 0.78 to 0.72 on balanced unseen
    faces. The models flagged only for accuracy not clearly above the majority rate, or a train/validation
    gap, stay candidates: with few images of the smaller class that test rarely passes."""
    collapsed = {m: checks for m, checks in flagged.items() if "one_class" in checks}
    return collapsed if len(collapsed) < len(models) else {}


def export_ensemble(storage: Storage, run_key: str, models: tuple[str, ...], card: dict) -> bytes:
    """One torch.export program over the members' model.pt2: one input per distinct member size."""
    members, sizes = [], []
    for name in models:
        module, meta = load_stored_model(storage, layout.model_prefix(run_key, name))
        if len(meta["input_sizes"]) != 1:
            raise ValueError(f"ensemble member {name} takes {len(meta['input_sizes'])} inputs, not one")
        members.append(module)
        sizes.append(meta["input_sizes"][0])
    input_sizes = sorted(set(sizes))
    wrapper = _Ensemble(members, [input_sizes.index(s) for s in sizes])
    meta = {"model": ENSEMBLE, "members": list(models), "member_sizes": sizes, "input_sizes": input_sizes,
            "image_size": max(sizes), "classes": list(CLASSES), "input": INPUT,
            "output": "P(male): the mean of the members'", **card}  # fmt: skip
    return save_program(wrapper, input_sizes, meta)


def build_ensemble(storage: Storage, *, run_key: str, settings: Settings) -> dict:
    """Write the ensemble of the run's models (at least two); returns a small summary (XCom-safe)."""
    if len(settings.models) < 2:
        return {"skipped": "an ensemble needs at least two models"}
    choice = choose_members(storage, run_key, tuple(settings.models))
    models = tuple(choice["members"])
    preds = _mean_predictions(storage, run_key, models)
    test = preds[preds["split"] == "test"]
    test_metrics = classification_metrics(encode_labels(test["label"]), test["prob_male"].to_numpy()) if len(test) \
        else None  # fmt: skip
    metrics = {"model": ENSEMBLE, "members": list(models), "weights": choice["weights"],
               "flagged": choice["flagged"], "excluded": choice["excluded"], "all_flagged": choice["all_flagged"],
               "selection": choice["steps"],
               "test": test_metrics,
               # Unlike the members' (running accuracy on augmented batches): the mean prediction on the
               # un-augmented training images.
               "train_accuracy": _accuracy(preds, "train"), "val_accuracy": _accuracy(preds, "val"),
               "seed": settings.seed}  # fmt: skip
    card = {"source": settings.source, "seed": settings.seed, "profile": settings.profile, "test_metrics": test_metrics}

    def key(name: str) -> str:
        return layout.model_file_key(run_key, ENSEMBLE, name)

    files = {"predictions.csv": tables.to_csv(preds, index=False).encode(),
             "metrics.json": json.dumps(metrics, indent=1).encode(),
             layout.MODEL_FILE: export_ensemble(storage, run_key, models, card)}  # fmt: skip
    for name, data in files.items():
        storage.put_bytes(key(name), data)
    # Written last, as a trained model's: the ensemble is complete, and its files are verified on read.
    checksums = {name: sha256_hex(data) for name, data in files.items()}
    storage.put_bytes(key(MODEL_CARD), json.dumps({**metrics, **card, "files": checksums}, indent=1).encode())
    accuracy = test_metrics["accuracy"] if test_metrics else None
    log.info("ensemble of %s: test accuracy %s", ", ".join(models), accuracy)
    return {"model": ENSEMBLE, "run_key": run_key, "test_accuracy": accuracy, "members": list(models),
            "model_uri": storage.url(key(layout.MODEL_FILE))}  # fmt: skip
