"""The report that checks itself, the ensemble chosen on validation, and intervals inside [0, 1].

Nothing here trains: models are stored fixtures (predictions.csv, metrics.json, history.json and a
tiny TorchScript export per model) written straight into a LocalStorage.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch
from report_fixtures import classes_of, good_probs, one_class_probs
from sklearn.metrics import log_loss

from gender_tasks import layout
from gender_tasks.data.manifest import write_manifest
from gender_tasks.evaluation import health
from gender_tasks.evaluation.metrics import classification_metrics, encode_labels
from gender_tasks.evaluation.predict import load_stored_model
from gender_tasks.evaluation.repeats import logit_t_interval, rank_first_counts, summarise_repeats
from gender_tasks.integrity import sha256_hex
from gender_tasks.settings import as_settings, resolve_settings
from gender_tasks.training.ensemble import GRID, build_ensemble, choose_members, select_members, weightings
from gender_tasks.training.export import export_model

SIZES = {"train": 60, "val": 40, "test": 40}  # images per split, half of each class


def _split_rows(sizes=SIZES) -> pd.DataFrame:
    rows = [{"key": f"{split}/{label}/{i:03d}.jpg", "split": split, "label": label}
            for split, n in sizes.items() for label in ("female", "male") for i in range(n // 2)]  # fmt: skip
    return pd.DataFrame(rows)


def _predictions(rows: pd.DataFrame, prob_male) -> pd.DataFrame:
    prob = np.asarray(prob_male, dtype=float)
    return rows.assign(prob_male=prob, predicted=classes_of(prob))[["key", "split", "label", "prob_male", "predicted"]]


# --- the checks, on predictions alone ------------------------------------------------------------------


def test_a_healthy_model_passes_every_check():
    rows = _split_rows()
    preds = _predictions(rows, good_probs(rows, 0.9, 0))
    assert health.check_predictions(preds, 0.92, model="cnn") == []


def test_a_model_forced_to_one_class_is_flagged_with_the_batchnorm_cause():
    rows = _split_rows()
    preds = _predictions(rows, one_class_probs(rows, 0))
    findings = health.check_predictions(preds, 0.876, model="mobilenetv2", repeat=1)
    assert {f["check"] for f in findings} == {"one_class", "not_above_majority", "train_val_gap"}
    assert all(f["model"] == "mobilenetv2" and f["repeat"] == 1 for f in findings)
    one = next(f for f in findings if f["check"] == "one_class")
    assert one["numbers"]["predicted_share"] == {"female": 1.0, "male": 0.0}
    assert one["numbers"]["val_accuracy"] == 0.5 and one["numbers"]["eval_train_accuracy"] == 0.5
    binom = next(f for f in findings if f["check"] == "not_above_majority")
    assert binom["numbers"]["majority_rate"] == 0.5 and binom["numbers"]["p_value"] > 0.5
    cause = health.likely_cause(findings)
    assert cause.startswith("BatchNorm running statistics lagging behind the weights after few optimizer steps")
    assert "more epochs" in cause and "0.876" in cause
    json.dumps(findings)  # machine-readable as they are


@pytest.mark.parametrize(("n", "majority"), [(106, 84 / 106), (40, 0.5), (30, 0.5), (6, 0.5), (4, 0.5), (5, 0.8)])
def test_the_right_answers_needed_to_pass_the_majority_check_are_the_tests_own_bound(n, majority):
    from scipy.stats import binomtest

    def passes(k):
        return binomtest(k, n, majority, alternative="greater").pvalue < health.ALPHA

    needed = health.correct_needed(n, majority)
    if needed is None:
        assert not passes(n)  # 4 balanced images, or 5 at a 0.8 majority: nothing could pass
    else:
        assert passes(needed) and not passes(needed - 1)
    assert health.correct_needed(106, 84 / 106) == 92  # the UTKFace run: its CNN had 89


def test_a_majority_flag_says_how_many_right_answers_would_have_passed():
    rows = _imbalanced_rows()  # 32 female / 8 male validation images: majority rate 0.8
    # 28 females right, 1 male: 29 of 40, and calling a face male says little about it being male
    findings = health.check_predictions(_predictions(rows, _wrong_on(rows, 4, 7, 0)), 0.9, model="cnn")
    (found,) = findings
    assert found["check"] == "not_above_majority" and found["numbers"]["correct_needed"] == 37
    assert (
        "p = 0.912 >= 0.05; 37 of 40 (0.925) would have shown it), and its predictions are not significantly "
        "associated with the labels either (balanced accuracy 0.500; one-sided Fisher exact test, p = 0.694)"
        in found["detail"]
    )
    assert found["numbers"]["association_p_value"] == pytest.approx(0.694, abs=1e-3)
    tiny = pd.DataFrame({"key": list("abcd"), "split": "val", "label": ["female", "male"] * 2,
                         "predicted": ["female", "male"] * 2})  # fmt: skip
    (found,) = health.check_predictions(tiny, None, model="cnn")
    assert "with 4 validation images not even all of them right would show it: too few to check)" in found["detail"]
    assert found["numbers"]["correct_needed"] is None


def test_nearly_one_class_counts_relative_to_the_labels():
    rows = _split_rows({"val": 40})
    prob = np.full(40, 0.2)
    prob[:1] = 0.8  # 1 of 40 predictions male (2.5 %, under 10 % of the labels' 50 %): nearly all one class
    assert "one_class" in {f["check"] for f in health.check_predictions(_predictions(rows, prob), None, model="cnn")}
    prob[:3] = 0.8  # 3 of 40 (7.5 %): not flagged as one class
    assert "one_class" not in {f["check"] for f in health.check_predictions(_predictions(rows, prob), None, model="x")}
    # Imbalanced labels (36 female, 4 male): a right model predicting male for 4 of 40 is not one-class.
    imbalanced = pd.DataFrame({"key": [f"v{i}" for i in range(40)], "split": "val",
                               "label": ["female"] * 36 + ["male"] * 4})  # fmt: skip
    right = _predictions(imbalanced, np.r_[np.full(36, 0.1), np.full(4, 0.9)])
    assert health.check_predictions(right, None, model="cnn") == []  # 40 of 40 beats 0.9: p = 0.9**40 = 0.015


def test_a_model_that_separates_the_classes_is_not_flagged_for_missing_the_majority_rate():
    """On an imbalanced split a model can learn both classes and still not beat always guessing the larger one
    by enough to show (a model weighted to count both classes alike trades majority errors for minority hits):
    26 of 32 females and all 8 males right is accuracy 0.85 (binomial p 0.29 against 0.8), balanced accuracy
    0.91, and calling a face male goes with it being male far beyond chance (Fisher p 4e-5): not flagged."""
    rows = _imbalanced_rows()
    assert health.check_predictions(_predictions(rows, _wrong_on(rows, 6, 0, 0)), 0.9, model="cnn") == []
    val = _predictions(rows, _wrong_on(rows, 6, 0, 0)).query("split == 'val'")
    p, balanced = health.association(val)
    assert p == pytest.approx(3.9e-5, rel=0.01) and balanced == pytest.approx((26 / 32 + 1) / 2)
    constant = _predictions(rows, np.full(len(rows), 0.2)).query("split == 'val'")
    assert health.association(constant) == (1.0, 0.5)  # a constant says nothing about the label


def test_accuracy_at_the_majority_rate_is_flagged_by_the_exact_binomial_test():
    rows = _split_rows({"val": 40})
    y = encode_labels(rows["label"])
    prob = np.where(y == 1, 0.8, 0.2)
    wrong = [0, 1, 2, 3, 4, 5, 6, 7, 20, 21, 22, 23, 24, 25, 26, 27]
    prob[wrong] = 1 - prob[wrong]
    findings = health.check_predictions(_predictions(rows, prob), None, model="cnn")  # 24 of 40 right
    (only,) = findings
    assert only["check"] == "not_above_majority"
    # P(X >= 24 | n = 40, p = 0.5), by hand: the sum of C(40, k) for k >= 24, over 2^40 = 0.134.
    expected = sum(math.comb(40, k) for k in range(24, 41)) / 2**40
    assert only["numbers"]["p_value"] == pytest.approx(expected) and expected == pytest.approx(0.134, abs=1e-3)
    prob[wrong[:4]] = 1 - prob[wrong[:4]]  # 28 of 40: p = 0.0083, significant
    assert health.check_predictions(_predictions(rows, prob), None, model="cnn") == []


def test_the_train_validation_gap_allows_for_the_split_sizes():
    rows = _split_rows({"train": 60, "val": 40})
    y = encode_labels(rows["label"])
    prob = np.where(y == 1, 0.8, 0.2)  # every training image right in eval mode: it fits them
    val_wrong = np.flatnonzero(rows["split"] == "val")[[0, 1, 2, 3, 4, 5, 20, 21, 22, 23, 24, 25]]
    prob[val_wrong] = 1 - prob[val_wrong]  # 28 of 40 validation images right: 0.7
    preds = _predictions(rows, prob)

    def gap(train_accuracy):
        return [
            f for f in health.check_predictions(preds, train_accuracy, model="cnn") if f["check"] == "train_val_gap"
        ]

    # 0.9 against 0.7 over 60 and 40 images: se = sqrt(0.9 * 0.1 / 60 + 0.7 * 0.3 / 40) = 0.0822, and the 95 %
    # lower bound 0.2 - 1.645 * 0.0822 = 0.065 is under the 0.15 tolerated.
    assert gap(0.9) == []
    (f,) = gap(1.0)  # 0.3 - 1.645 * sqrt(0.7 * 0.3 / 40) = 0.181
    assert f["numbers"]["lower_bound"] == pytest.approx(0.3 - 1.6448536 * math.sqrt(0.21 / 40), abs=1e-6)
    assert f["numbers"]["val_accuracy"] == 0.7 and f["numbers"]["eval_train_accuracy"] == 1.0
    assert health.likely_cause([f]).startswith("overfitting")  # eval mode fits the training images: not BatchNorm


def test_no_validation_images_and_missing_columns():
    rows = _split_rows({"train": 10, "test": 10})
    (f,) = health.check_predictions(_predictions(rows, np.full(20, 0.7)), 0.9, model="cnn")
    assert f["check"] == "no_validation"
    with pytest.raises(ValueError, match="predicted"):
        health.check_predictions(rows, 0.9, model="cnn")


# --- the ensemble: members chosen on validation only -----------------------------------------------------


def test_selection_is_never_worse_than_the_best_member_on_validation():
    rng = np.random.default_rng(7)
    for trial in range(20):
        y = rng.integers(0, 2, 50)
        probs = {f"m{i}": np.clip(np.where(y == 1, 0.5 + rng.normal(0.1, 0.3, 50), 0.5 - rng.normal(0.1, 0.3, 50)),
                                  0.01, 0.99) for i in range(4)}  # fmt: skip
        best = max(float(((p >= 0.5) == y).mean()) for p in probs.values())
        best_loss = min(log_loss(y, p) for p in probs.values() if float(((p >= 0.5) == y).mean()) == best)
        chosen = select_members(y, probs)
        mix = sum(w * probs[m] for m, w in zip(chosen["members"], chosen["weights"], strict=True))
        assert chosen["val_accuracy"] == pytest.approx(float(((mix >= 0.5) == y).mean()))
        assert chosen["val_log_loss"] == pytest.approx(log_loss(y, mix))  # sklearn's, computed for every weighting
        assert chosen["val_accuracy"] >= best, trial
        assert chosen["val_log_loss"] <= best_loss + 1e-12, trial
        assert sum(chosen["weights"]) == pytest.approx(1.0) and min(chosen["weights"]) > 0
        assert all(round(w * GRID) == pytest.approx(w * GRID) for w in chosen["weights"])
        assert chosen["weights"] == sorted(chosen["weights"], reverse=True)
        assert chosen["weightings"] == 1771 and 1 <= chosen["as_accurate"] <= 1771  # C(23, 3): 4 models, 0.05 steps


def test_selection_weighs_a_member_in_only_when_it_helps():
    y = np.array([1, 1, 1, 0, 0, 0])
    a = np.array([0.9, 0.9, 0.4, 0.1, 0.1, 0.1])  # 5 of 6
    b = np.array([0.9, 0.4, 0.9, 0.1, 0.1, 0.1])  # 5 of 6, different mistake
    c = np.array([0.4, 0.9, 0.9, 0.1, 0.1, 0.1])  # 5 of 6, another mistake: the three together fix all
    chosen = select_members(y, {"a": a, "b": b, "c": c})
    assert chosen["val_accuracy"] == 1.0 and sorted(chosen["members"]) == ["a", "b", "c"]
    assert chosen["weights"] == pytest.approx([0.35, 0.35, 0.3])  # symmetric: any of the three may take 0.35
    useless = np.full(6, 0.5 - 1e-3)  # every image female, barely: any weight on it only adds log-loss
    alone = select_members(y, {"a": a, "u": useless})
    assert alone["members"] == ["a"] and alone["weights"] == [1.0] and alone["best_single"]["model"] == "a"
    # Weights, not only members: an overconfident model gains from a little of a calibrated one even where the
    # plain mean of the two would lose accuracy.
    sharp = np.array([0.999, 0.999, 0.001, 0.001, 0.001, 0.001])  # 5 of 6, very sure of its mistake
    soft = np.array([0.6, 0.3, 0.6, 0.4, 0.6, 0.4])  # 4 of 6
    mixed = select_members(y, {"sharp": sharp, "soft": soft})
    assert mixed["members"][0] == "sharp" and mixed["val_accuracy"] == 5 / 6
    assert mixed["val_log_loss"] < log_loss(y, sharp) and 0.5 <= mixed["weights"][0] < 1
    with pytest.raises(ValueError, match="validation"):
        select_members(np.array([], dtype=int), {"a": np.array([])})
    with pytest.raises(ValueError, match="candidate"):
        select_members(y, {})


def test_weightings_cover_the_grid_once():
    for k, n in ((1, 1), (2, 21), (3, 231), (4, 1771)):
        w = weightings(k)
        assert w.shape == (n, k) and np.allclose(w.sum(axis=1), 1) and (w >= 0).all()
        assert len({tuple(np.round(row * GRID).astype(int)) for row in w}) == n


# --- stored fixtures: a run's models without training ----------------------------------------------------


class _Constant(torch.nn.Module):
    """A stand-in network: a logit from the mean pixel, so each fixture model exports like a real one."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.mean(dim=(1, 2, 3)) * self.scale).unsqueeze(1)


@functools.cache
def _exported(name: str, size: int) -> bytes:
    """A stand-in model's export, made once per name and size (torch.export takes a second; the bytes are
    the same every time)."""
    return export_model(_Constant(float(len(name))), name, size, {"seed": 0})


def write_model(storage, run_key: str, name: str, preds: pd.DataFrame, train_accuracy: float, size: int = 16,
                last_epoch: dict | None = None):  # fmt: skip
    def put(file: str, data: bytes) -> None:
        storage.put_bytes(layout.model_file_key(run_key, name, file), data)

    test = preds[preds.split == "test"]
    val = preds[preds.split == "val"]
    val_acc = float((val.label == val.predicted).mean())
    metrics = {"model": name, "train_accuracy": train_accuracy, "val_accuracy": val_acc,
               "test": classification_metrics(encode_labels(test.label), test.prob_male.to_numpy()), "epochs": 2,
               "image_size": size, "freeze_epochs": 0, "weights": "none", "parameters": 10, "train_seconds": 1.0,
               "mean_images_per_s": 100.0, "device": "cpu"}  # fmt: skip
    history = [{"epoch": e, "accuracy": train_accuracy, "val_accuracy": val_acc, "loss": 0.5, "val_loss": 0.6}
               for e in (1, 2)]  # fmt: skip
    history[-1].update(last_epoch or {})
    put("predictions.csv", preds.to_csv(index=False).encode())
    put("metrics.json", json.dumps(metrics).encode())
    put("history.json", json.dumps(history).encode())
    put("model.pt2", _exported(name, size))
    record_card(storage, run_key, name)


def record_card(storage, run_key: str, name: str) -> None:
    """The model card training writes last: the sha256 of each file, which readers check."""
    files = {f: sha256_hex(storage.get_bytes(layout.model_file_key(run_key, name, f)))
             for f in ("predictions.csv", "history.json", "metrics.json", "model.pt2")}  # fmt: skip
    storage.put_bytes(layout.model_file_key(run_key, name, "model_card.json"), json.dumps({"files": files}).encode())


def write_split(storage, rows: pd.DataFrame, key: str = "splits/s.csv") -> str:
    manifest = rows.assign(sha256=[f"{i:064x}" for i in range(len(rows))], source_path=rows["key"])
    write_manifest(storage, key, manifest)
    return key


MODELS = ("cnn", "resnet50", "mobilenetv2")


def _settings(tmp_path, **extra):
    return resolve_settings({"profile": "tiny", "models": list(MODELS), "source": str(tmp_path / "src"),
                             "storage": str(tmp_path / "store"), **extra})  # fmt: skip


def _write_run(storage, run_key: str, seed: int = 0) -> pd.DataFrame:
    rows = _split_rows()
    write_model(storage, run_key, "cnn", _predictions(rows, good_probs(rows, 0.85, seed)), 0.88)
    write_model(storage, run_key, "resnet50", _predictions(rows, good_probs(rows, 0.8, seed + 1)), 0.83,
                last_epoch={"batchnorm_recalibrated_on": 60, "val_accuracy_before_recalibration": 0.5})  # fmt: skip
    write_model(storage, run_key, "mobilenetv2", _predictions(rows, one_class_probs(rows, seed)), 0.876)
    return rows


@pytest.mark.slow  # exports the ensemble (6 s here)
def test_a_model_forced_to_one_class_is_left_out_of_the_ensemble(local_storage, tmp_path):
    _write_run(local_storage, "r1")
    out = build_ensemble(local_storage, run_key="r1", settings=_settings(tmp_path))
    assert "mobilenetv2" not in out["members"] and out["members"]
    metrics = json.loads(local_storage.get_bytes(layout.model_file_key("r1", "ensemble", "metrics.json")))
    assert set(metrics["excluded"]["mobilenetv2"]) == {"one_class", "not_above_majority", "train_val_gap"}
    assert metrics["flagged"] == metrics["excluded"]
    assert metrics["all_flagged"] is False and metrics["members"] == out["members"]
    # The stored ensemble is the weighted mean of exactly the chosen members, with the weights it records.
    ens = pd.read_csv(local_storage.local_path(layout.model_file_key("r1", "ensemble", "predictions.csv")))
    members = [pd.read_csv(local_storage.local_path(layout.model_file_key("r1", m, "predictions.csv")))
               .set_index("key")["prob_male"] for m in metrics["members"]]  # fmt: skip
    assert len(metrics["weights"]) == len(members) and sum(metrics["weights"]) == pytest.approx(1.0)
    expected = sum(w * p for w, p in zip(metrics["weights"], members, strict=True)).loc[ens["key"]].to_numpy()
    assert ens["prob_male"].to_numpy() == pytest.approx(expected)
    assert metrics["val_accuracy"] >= max(
        json.loads(local_storage.get_bytes(layout.model_file_key("r1", m, "metrics.json")))["val_accuracy"]
        for m in ("cnn", "resnet50")
    )
    _, meta = load_stored_model(local_storage, layout.model_prefix("r1", "ensemble"))
    assert meta["members"] == metrics["members"]


def test_ensemble_selection_reads_no_test_data(local_storage, monkeypatch):
    from gender_tasks.training import ensemble

    rows = _write_run(local_storage, "r2", seed=3)
    seen = []

    def spy(labels, val_probs):
        seen.append((len(labels), {m: len(p) for m, p in val_probs.items()}))
        return select_members(labels, val_probs)

    monkeypatch.setattr(ensemble, "select_members", spy)
    before = choose_members(local_storage, "r2", MODELS)
    assert seen == [(40, {"cnn": 40, "resnet50": 40})]  # the 40 validation images of the unflagged models only
    # Poison every test row: the test split now says the opposite of everything, and the best model there
    # changes. The choice must not move.
    for name in MODELS:
        key = layout.model_file_key("r2", name, "predictions.csv")
        preds = pd.read_csv(io.BytesIO(local_storage.get_bytes(key)), keep_default_na=False)
        test = preds["split"] == "test"
        rng = np.random.default_rng(len(name))
        preds.loc[test, "prob_male"] = rng.random(int(test.sum()))
        preds.loc[test, "label"] = rng.choice(["female", "male"], int(test.sum()))
        preds["predicted"] = classes_of(preds["prob_male"])
        local_storage.put_bytes(key, preds.to_csv(index=False).encode())
        record_card(local_storage, "r2", name)
    after = choose_members(local_storage, "r2", MODELS)
    assert after == before
    assert len(rows[rows.split == "test"]) == 40


def test_when_every_model_is_flagged_the_ensemble_says_so(local_storage, tmp_path):
    rows = _split_rows()
    for i, name in enumerate(MODELS):
        write_model(local_storage, "r3", name, _predictions(rows, one_class_probs(rows, i)), 0.9)
    out = build_ensemble(local_storage, run_key="r3", settings=_settings(tmp_path))
    metrics = json.loads(local_storage.get_bytes(layout.model_file_key("r3", "ensemble", "metrics.json")))
    assert metrics["all_flagged"] is True and set(metrics["flagged"]) == set(MODELS) and metrics["excluded"] == {}
    assert out["members"]  # chosen among the flagged models, and flagged as such


def _imbalanced_rows() -> pd.DataFrame:
    """Four female images to one male in every split: 48 / 12 train, 32 / 8 validation and test."""
    rows = [{"key": f"{split}/{label}/{i:03d}.jpg", "split": split, "label": label}
            for split, (f, m) in {"train": (48, 12), "val": (32, 8), "test": (32, 8)}.items()
            for label, n in (("female", f), ("male", m)) for i in range(n)]  # fmt: skip
    return pd.DataFrame(rows)


def _wrong_on(rows: pd.DataFrame, female_wrong: int, male_wrong: int, offset: int) -> np.ndarray:
    """Right and sure on most images; per split, `female_wrong` female images at 0.6 (called male) and
    `male_wrong` male ones at 0.3, starting at `offset`: the validation accuracy of the UTKFace run's CNN."""
    prob = np.where(rows["label"] == "male", 0.95, 0.1)
    for _, part in rows.groupby("split"):
        female, male = part.index[part["label"] == "female"], part.index[part["label"] == "male"]
        prob[female[offset : offset + female_wrong]] = 0.6
        prob[male[offset : offset + male_wrong]] = 0.3
    return prob


def test_when_every_model_is_flagged_a_collapsed_one_is_still_left_out(local_storage):
    """An imbalanced split (as on 560 female / 147 male real photos, where every model was flagged): the CNN and
    MobileNetV2 flagged for accuracy not above the 0.8 majority rate with predictions barely tied to the labels,
    ResNet50 for calling every image female. The choice on validation alone takes the constant on that imbalanced
    split (it pulls the CNN's false males back to female); it is left out."""
    rows = _imbalanced_rows()
    write_model(local_storage, "r5", "cnn", _predictions(rows, _wrong_on(rows, 4, 6, 0)), 0.9)
    write_model(local_storage, "r5", "mobilenetv2", _predictions(rows, _wrong_on(rows, 5, 6, 2)), 0.88)
    write_model(local_storage, "r5", "resnet50", _predictions(rows, np.full(len(rows), 0.2)), 0.8)
    choice = choose_members(local_storage, "r5", MODELS)
    assert choice["all_flagged"] is True and set(choice["flagged"]) == set(MODELS)
    assert choice["flagged"]["cnn"] == choice["flagged"]["mobilenetv2"] == ["not_above_majority"]
    assert (
        choice["excluded"] == {"resnet50": choice["flagged"]["resnet50"]}
        and "one_class" in choice["excluded"]["resnet50"]
    )
    assert "resnet50" not in choice["members"] and choice["members"][0] == "cnn"
    # Without the rule select_members takes the constant: CNN + ResNet50 is right on 34 of 40 (the CNN on 30,
    # the constant on 32).
    val = rows["split"] == "val"
    y = encode_labels(rows.loc[val, "label"])
    everything = select_members(y, {"cnn": _wrong_on(rows, 4, 6, 0)[val], "resnet50": np.full(int(val.sum()), 0.2)})
    assert set(everything["members"]) == {"cnn", "resnet50"} and everything["val_accuracy"] == 34 / 40


def test_training_logs_a_warning_for_a_flagged_model(local_storage, caplog):
    from gender_tasks.training.trainer import _warn_if_flagged

    _write_run(local_storage, "r4")
    caplog.clear()  # torch.export's own debug records while the models were written
    caplog.set_level(logging.WARNING, logger="gender_tasks.training.trainer")
    _warn_if_flagged(local_storage, "r4", "cnn")
    assert caplog.records == []
    _warn_if_flagged(local_storage, "r4", "mobilenetv2")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "mobilenetv2 is flagged (one_class)" in text and "BatchNorm running statistics" in text


# --- the report, built from the fixtures ---------------------------------------------------------------
# The ensemble as training.ensemble writes it, read by the report. Each section on its own, and two repeats'
# intervals, are tested on report_fixtures' run in test_report.py.


def _report(storage, tmp_path, repeats: int = 1):
    from gender_tasks.reporting.report import build_report

    settings = _settings(tmp_path, repeats=repeats)
    split_keys = []
    for r in range(repeats):
        key = layout.repeat_run_key("run1", r)
        rows = _write_run(storage, key, seed=10 * r)
        build_ensemble(storage, run_key=key, settings=settings.for_repeat(r))
        split_keys.append(write_split(storage, rows, f"splits/{r}.csv"))
    build_report(storage, run_key="run1", settings=settings, dataset={"dataset_id": "ds-test", "images": 280},
                 validation={"evaluated": 1, "success": True, "failed": []}, split_key=split_keys[0],
                 repeat_split_keys=split_keys)  # fmt: skip
    html = storage.get_bytes(layout.report_key("run1")).decode()
    return html, json.loads(storage.get_bytes(layout.results_key("run1")))


@pytest.mark.slow  # exports the ensemble and builds a report (4 s here)
def test_the_report_warns_marks_the_row_and_names_the_ensemble_members(local_storage, tmp_path):
    html, results = _report(local_storage, tmp_path)
    warnings = results["warnings"]
    assert {w["model"] for w in warnings} == {"mobilenetv2"}
    assert {w["check"] for w in warnings} == {"one_class", "not_above_majority", "train_val_gap"}
    assert all(set(w) == {"model", "repeat", "check", "detail", "numbers"} and w["repeat"] == 0 for w in warnings)
    flag = results["flagged"]["mobilenetv2"]
    assert flag["left_out_of_ensemble"] == [0] and "BatchNorm running statistics" in flag["causes"][0]
    # The warning sits at the top, before Table 1, and names the model and the cause.
    top = html[: html.index('id="table1"')]
    assert 'id="warnings"' in top and 'data-flagged-model="mobilenetv2"' in top
    assert "MobileNet V2" in top and "BatchNorm running statistics" in top and "Left out of the ensemble" in top
    assert 'data-model="mobilenetv2" class="flagged" data-flagged="true"' in html
    assert 'data-model="cnn" class="flagged"' not in html
    (ens,) = results["ensemble"]
    assert "mobilenetv2" in ens["excluded"] and "mobilenetv2" not in ens["members"]
    members = html[html.index('id="ensemble-members"') :]
    members = members[: members.index("</p>")]
    for label in ens["labels"]:
        assert label in members
    assert "Left out" in members and "MobileNet V2" in members and "validation split only" in members
    card = html[html.index('id="model-resnet50"') :]
    assert "BatchNorm statistics recomputed on\n60 training images" in card[: card.index("</p>")]
    assert (
        "BatchNorm statistics recomputed" not in html[html.index('id="model-cnn"') : html.index('id="model-resnet50"')]
    )


def test_a_one_model_run_skips_the_ensemble_and_its_report_says_why(local_storage, tmp_path):
    """The decision is the run's settings' (pipeline.skip_reason), as for the switched-off steps: the DAG
    ends the ensemble task skipped with this reason as its result, and the report says it."""
    from gender_tasks import pipeline
    from gender_tasks.reporting.report import build_report

    def run(**conf) -> dict:
        return pipeline.prepare({"profile": "tiny", "source": str(tmp_path / "src"), "storage": local_storage.uri,
                                 **conf})  # fmt: skip

    one = run(models=["cnn"])
    reason = "an ensemble needs at least two models; this run trains only cnn"
    assert pipeline.skip_reason(one, "ensemble") == reason and pipeline.is_switched_off(one, "ensemble")
    two = run(models=["cnn", "mobilenetv2"], label_audit=False)
    assert pipeline.skip_reason(two, "ensemble") is None and not pipeline.is_switched_off(two, "ensemble")
    # The switched-off steps keep their reasons.
    assert pipeline.skip_reason(two, "label_audit") == "label_audit is switched off in this run's settings"
    assert pipeline.skip_reason(two, "evaluate_external") == "evaluate_external is switched off in this run's settings"
    assert pipeline.skip_reason(one, "label_audit") is None  # on by default
    # Called without the DAG, the step says the same and writes nothing; the report lists no time for it.
    ensembled = pipeline.ensemble(one)
    assert ensembled["skipped"] == reason
    assert not local_storage.exists(layout.model_file_key(one["run_key"], "ensemble", "model.pt2"))
    assert "ensemble" not in pipeline.task_durations(one, [], None, None, {"skipped": reason})

    rows = _split_rows()
    write_model(local_storage, "one", "cnn", _predictions(rows, good_probs(rows, 0.85, 0)), 0.88)
    settings = as_settings(one["settings"])
    build_report(local_storage, run_key="one", settings=settings, dataset={"dataset_id": "ds-test", "images": 140},
                 validation={"evaluated": 1, "success": True, "failed": []},
                 split_key=write_split(local_storage, rows), ensemble_skipped=reason)  # fmt: skip
    results = json.loads(local_storage.get_bytes(layout.results_key("one")))
    assert results["ensemble"] is None and results["ensemble_skipped"] == reason
    assert [row["model"] for row in results["table"]] == ["cnn"]
    html = local_storage.get_bytes(layout.report_key("one")).decode()
    said = html[html.index('id="ensemble-skipped"') :]
    assert reason in said[: said.index("</p>")] and 'id="ensemble-members"' not in html


# --- honest intervals over repeats --------------------------------------------------------------------------


def test_two_repeats_of_0_5_and_1_give_an_interval_inside_0_1():
    # The case: a plain t-interval of [0.5, 1.0] is 0.75 +- 12.706 * 0.354 / 1.414 = [-2.43, 3.93].
    per_repeat = [{"cnn": {"test_accuracy": 0.5, "f1": 0.5, "roc_auc": 0.5}},
                  {"cnn": {"test_accuracy": 1.0, "f1": 1.0, "roc_auc": 1.0}}]  # fmt: skip
    summary = summarise_repeats(per_repeat, n_images=40)["cnn"]
    for name in ("test_accuracy", "f1", "roc_auc"):
        s = summary[name]
        assert 0.0 < s["ci_low"] < s["mean"] < s["ci_high"] < 1.0, (name, s)
        assert s["mean"] == 0.75 and s["std"] == pytest.approx(math.sqrt(0.125))
    # By hand: 1.0 moves half an image inside, to 1 - 0.5 / 40 = 0.9875; logits 0 and ln(79) = 4.3694;
    # mean 2.1847, sd 3.0897, half-width 12.7062 * 3.0897 / sqrt(2) = 27.760.
    low, high = logit_t_interval([0.5, 1.0], n_images=40)
    assert low == pytest.approx(1 / (1 + math.exp(27.760 - 2.1847)), rel=1e-3)
    assert high == pytest.approx(1 / (1 + math.exp(-(2.1847 + 27.760))), abs=1e-12)


def test_logit_interval_is_close_to_the_t_interval_away_from_the_bounds():
    values = [0.80, 0.84, 0.82, 0.81, 0.83]
    low, high = logit_t_interval(values)
    mean, half = np.mean(values), 2.776 * np.std(values, ddof=1) / math.sqrt(5)
    assert low == pytest.approx(mean - half, abs=2e-3) and high == pytest.approx(mean + half, abs=2e-3)
    assert logit_t_interval([0.9, 0.9, 0.9]) == (0.9, 0.9)
    assert all(math.isnan(v) for v in logit_t_interval([0.9]))
    with pytest.raises(ValueError, match="n_images"):
        logit_t_interval([0.5, 1.0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        logit_t_interval([0.5, 1.2], n_images=10)


def test_rank_first_is_a_whole_count_with_ties_as_ties():
    per_repeat = [{"cnn": {"test_accuracy": 0.9}, "resnet50": {"test_accuracy": 0.8}},
                  {"cnn": {"test_accuracy": 0.84}, "resnet50": {"test_accuracy": 0.84}},
                  {"cnn": {"test_accuracy": 0.7}, "resnet50": {"test_accuracy": 0.8}, "ensemble": {}}]  # fmt: skip
    counts = rank_first_counts(per_repeat)
    assert counts["alone"] == {"cnn": 1, "resnet50": 1, "ensemble": 0}
    assert counts["tied"] == {"cnn": 1, "resnet50": 1, "ensemble": 0}
    assert counts["ties"] == [{"repeat": 1, "models": ["cnn", "resnet50"]}]
