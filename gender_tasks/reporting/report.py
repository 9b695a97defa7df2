"""Gather every model's outputs into one self-contained HTML report and machine-readable results.

    runs/<run_key>/report.html    the study's Table 1 beside ours, uncertainty, plots, audits
    runs/<run_key>/results.json   the same numbers as data

The template lives in `include/report.html.j2`; Jinja2 autoescaping keeps text that comes from
data (file names, labels, settings) from injecting markup. Plots are inline SVG (matplotlib).
"""

from __future__ import annotations

import html
import io
import itertools
import json
import logging
import math
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from .. import layout, tables
from ..data.attributes import read_attributes
from ..data.images import decode_resize
from ..data.manifest import read_image, read_manifest
from ..data.split import split_counts as count_splits
from ..evaluation import health
from ..evaluation.metrics import encode_labels
from ..evaluation.repeats import pairwise_corrected_tests, rank_first_counts, summarise_repeats
from ..evaluation.stats import bootstrap_ci, mcnemar
from ..models.registry import get_model_spec, model_names
from ..resources import include_path
from ..settings import CLASSES, ENSEMBLE, PROFILES, Settings, resolve_settings
from ..storage import Storage, get_recorded

log = logging.getLogger(__name__)

SIGNIFICANCE = 0.05
GROUPS_SHOWN = 20  # per attribute, the largest
ROC_POINTS = 400  # vertices of a plotted ROC curve, whatever the test set's size


TABLE_METRICS = ("train_accuracy", "test_accuracy", "precision", "recall", "f1")
INTERVAL_METHOD = "95% t-interval of the mean on the logit scale, transformed back (inside [0, 1])"
MIN_REPEATS_FOR_INTERVALS = 3  # below this, an interval over repeats rests on one degree of freedom


def _health(storage: Storage, run_key: str, settings: Settings, models: list[str], first: dict) -> list[dict]:
    """Every health finding (evaluation.health) of every reported model in every repeat; `first` holds
    repeat 0's outputs, already read."""
    findings = []
    for r in range(settings.repeats):
        key = layout.repeat_run_key(run_key, r)
        for m in models:
            out = first[m] if r == 0 else load_model_outputs(storage, key, m)
            findings += health.check_predictions(out["predictions"], out["metrics"].get("train_accuracy"),
                                                 model=m, repeat=r)  # fmt: skip
    return findings


def _ensemble_members(storage: Storage, run_key: str, settings: Settings, first: dict) -> list[dict] | None:
    """Per repeat: the ensemble's members, weights and the models it left out (its metrics.json)."""
    if ENSEMBLE not in first:
        return None
    out = []
    for r in range(settings.repeats):
        met = first[ENSEMBLE]["metrics"] if r == 0 else json.loads(
            storage.get_bytes(layout.model_file_key(layout.repeat_run_key(run_key, r), ENSEMBLE, "metrics.json")))  # fmt: skip
        members = met["members"]
        out.append({"repeat": r, "members": members, "labels": [_label(m) for m in members],
                    "weights": met.get("weights", [1 / len(members)] * len(members)),
                    "excluded": met.get("excluded", {}), "all_flagged": met.get("all_flagged", False)})  # fmt: skip
    return out


def _label(model_name: str) -> str:
    return "Ensemble (mean probability)" if model_name == ENSEMBLE else get_model_spec(model_name).display_name


def _svg(fig, title: str) -> str:
    """The figure as inline SVG with an accessible name: role img, aria-label and a <title> (what a
    screen reader reads and a pointer shows) saying what the plot is."""
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    svg = buf.getvalue()
    svg = svg[svg.index("<svg") :]  # drop the XML prolog so it can sit inside HTML
    end = svg.index(">") + 1
    label = html.escape(title, quote=True)
    return f'{svg[: end - 1]} role="img" aria-label="{label}"><title>{label}</title>{svg[end:]}'


def _plots(history: list[dict], cm: list[list[int]], y_true, prob, label: str = "") -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(5.8, 2.3))
    ax1.plot(epochs, [h["accuracy"] for h in history], "o-", label="train")
    ax1.plot(epochs, [h["val_accuracy"] for h in history], "s--", label="validation")
    ax1.set(title="Accuracy", xlabel="epoch", ylim=(0, 1.02))
    ax2.plot(epochs, [h["loss"] for h in history], "o-", label="train")
    ax2.plot(epochs, [h["val_loss"] for h in history], "s--", label="validation")
    ax2.set(title="Loss", xlabel="epoch")
    ax1.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    curves = _svg(fig, f"{label}: accuracy and loss per epoch, train and validation".lstrip(": "))

    fig, ax = plt.subplots(figsize=(2.3, 2.2))
    arr = np.asarray(cm)
    ax.imshow(arr, cmap="Blues")
    for (i, j), v in np.ndenumerate(arr):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > arr.max() / 2 else "black")
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=CLASSES, yticklabels=CLASSES, xlabel="predicted", ylabel="true")
    ax.set_title("Confusion matrix (test)")
    cells = ", ".join(f"true {CLASSES[i]} predicted {CLASSES[j]}: {v}" for (i, j), v in np.ndenumerate(arr))
    confusion = _svg(fig, f"{label}: confusion matrix on the test images ({cells})".lstrip(": "))

    fig, ax = plt.subplots(figsize=(2.3, 2.2))
    if len(set(np.asarray(y_true).tolist())) == 2:
        fpr, tpr, _ = roc_curve(y_true, prob)
        keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), ROC_POINTS)).round().astype(int))
        ax.plot(fpr[keep], tpr[keep])  # thinned: the SVG's size does not grow with the test set
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (test, male = positive)")
    roc = _svg(fig, f"{label}: ROC curve on the test images, male as the positive class".lstrip(": "))
    return {"curves": curves, "confusion": confusion, "roc": roc}


def code_version() -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def load_model_outputs(storage: Storage, run_key: str, model_name: str) -> dict:
    def read(name: str) -> bytes:
        return storage.get_bytes(layout.model_file_key(run_key, model_name, name))

    history_key = layout.model_file_key(run_key, model_name, "history.json")
    return {
        "metrics": json.loads(read("metrics.json")),
        "history": json.loads(read("history.json")) if storage.exists(history_key) else [],  # none for the ensemble
        "predictions": tables.read_csv(io.BytesIO(read("predictions.csv")), keep_default_na=False),
    }


def _reported_models(storage: Storage, run_key: str, settings: Settings) -> list[str]:
    """The run's models, then the ensemble where the run made one."""
    has_ensemble = storage.exists(layout.model_file_key(run_key, ENSEMBLE, "metrics.json"))
    return [*settings.models, *([ENSEMBLE] if has_ensemble else [])]


def _table_values(metrics: dict) -> dict:
    t = metrics["test"]
    return {"train_accuracy": metrics["train_accuracy"], "test_accuracy": t["accuracy"],
            "precision": t["weighted"]["precision"], "recall": t["weighted"]["recall"], "f1": t["weighted"]["f1"],
            "roc_auc": t["roc_auc"]}  # fmt: skip


def _mcnemar_pairs(test_preds: dict) -> list[dict]:
    """McNemar for every pair of models scored on the same test images."""
    out = []
    for a, b in itertools.combinations(test_preds, 2):
        keys_a, y, pa = test_preds[a]
        keys_b, _, pb = test_preds[b]
        if keys_a != keys_b:
            continue  # different test sets cannot be paired
        res = mcnemar(y, pa, pb)
        acc_a, acc_b = float((pa == y).mean()), float((pb == y).mean())
        out.append({"a": _label(a), "b": _label(b), "acc_diff": acc_a - acc_b, **res,
                    "significant": res["p_value"] < SIGNIFICANCE})  # fmt: skip
    return out


def _test_predictions(preds: pd.DataFrame) -> tuple[list[str], np.ndarray, np.ndarray]:
    test = preds[preds["split"] == "test"].sort_values("key")
    return test["key"].tolist(), encode_labels(test["label"]), encode_labels(test["predicted"])


def _repeats_section(storage: Storage, run_key: str, settings: Settings, models: list[str],
                     repeat_split_keys: list[str]) -> dict | None:  # fmt: skip
    """Over the repeats (seed + r, each its own split): mean, std, range and t-interval per model and
    metric, how often each model ranks first, Nadeau & Bengio's corrected resampled t-test per pair, and
    in how many repeats McNemar's test called each pair significant."""
    if settings.repeats < 2:
        return None
    per_repeat, mcnemar_hits = [], {}
    for r in range(settings.repeats):
        key = layout.repeat_run_key(run_key, r)
        outputs = {m: load_model_outputs(storage, key, m) for m in models}
        per_repeat.append({m: _table_values(o["metrics"]) for m, o in outputs.items()})
        for c in _mcnemar_pairs({m: _test_predictions(o["predictions"]) for m, o in outputs.items()}):
            mcnemar_hits[(c["a"], c["b"])] = mcnemar_hits.get((c["a"], c["b"]), 0) + int(c["significant"])
    counts = count_splits(read_manifest(storage, repeat_split_keys[0]))
    n_train, n_test = (sum(counts.get(s, {}).values()) for s in ("train", "test"))
    tests = pairwise_corrected_tests(per_repeat, n_train=n_train, n_test=n_test)
    rank_first = rank_first_counts(per_repeat)
    for t in tests:
        t["significant"] = not math.isnan(t["p"]) and bool(t["p"] < SIGNIFICANCE)  # NaN: not testable
        t["mcnemar_significant_repeats"] = mcnemar_hits.get((_label(t["a"]), _label(t["b"])), 0)
        t["a_label"], t["b_label"] = _label(t["a"]), _label(t["b"])
    return {"repeats": settings.repeats, "seeds": [settings.seed + r for r in range(settings.repeats)],
            "summary": summarise_repeats(per_repeat, n_images=n_test), "interval": INTERVAL_METHOD,
            "interval_means_little": settings.repeats < MIN_REPEATS_FOR_INTERVALS,
            "rank_first": {"alone": rank_first["alone"], "tied": rank_first["tied"]}, "ties": rank_first["ties"],
            "corrected_tests": tests, "n_train": n_train, "n_test": n_test, "per_repeat": per_repeat}  # fmt: skip


def _describe_recipe(settings: Settings) -> dict[str, str]:
    r, lr = settings.recipe, settings.learning_rate
    optimiser = f"{'AdamW' if r.optimizer == 'adamw' else 'Adam'}, learning rate {lr:g}"
    if r.weight_decay:
        optimiser += f", weight decay {r.weight_decay:g}"
    if any(p.freeze_epochs for p in settings.per_model.values()):
        optimiser += f" (fine-tuning {settings.fine_tune_learning_rate:g})"
    schedule = ("constant" if r.schedule == "constant" else
                f"per step: linear warm-up over {r.warmup_fraction:.0%} of the steps, then cosine to 0")  # fmt: skip
    return {
        "Weights": settings.weights,
        "Input size (px)": ", ".join(f"{_label(m)} {p.image_size}" for m, p in settings.per_model.items()),
        "Epochs (frozen)": ", ".join(f"{_label(m)} {p.epochs} ({p.freeze_epochs})" for m, p in settings.per_model.items()),
        "Batch": str(settings.batch_size),
        "Optimiser": optimiser,
        "Schedule": schedule,
        "Loss": "BCE" + (f", label smoothing {r.label_smoothing:g}" if r.label_smoothing else ""),
        "Augmentation": "horizontal flips" if r.augmentation == "flip" else "flips, rotation ±10°, zoom ±10 %",
        "Test-time augmentation": "mean of the image and its mirror" if r.tta else "none",
        "Weights kept": "last epoch",
    }  # fmt: skip


def _setup_comparison(settings: Settings) -> list[dict]:
    """This run's training setup beside the study's (the `paper` profile) for Table 1's caption."""
    study = _describe_recipe(resolve_settings({"profile": "paper", "models": list(settings.models)}))
    ours = _describe_recipe(settings)
    return [{"setting": k, "ours": ours[k], "study": study[k], "same": ours[k] == study[k]} for k in ours]


def _group_accuracy(test: pd.DataFrame, attributes: pd.DataFrame | None, min_n: int = 10) -> list[dict]:
    """Test accuracy per value of each attribute, and the largest gap between groups of >= min_n images."""
    if attributes is None or test.empty:
        return []
    joined = test.merge(attributes, on="sha256", how="inner")
    out = []
    for col in attributes.columns:
        if col == "sha256":
            continue
        groups = [{"group": str(g), "n": len(part), "accuracy": float((part["label"] == part["predicted"]).mean())}
                  for g, part in joined.groupby(col) if str(g) != ""]  # fmt: skip
        big = [g for g in groups if g["n"] >= min_n]
        gap = max(g["accuracy"] for g in big) - min(g["accuracy"] for g in big) if len(big) >= 2 else None
        # The largest groups only: an attribute with thousands of values (an id) must not make the page huge.
        shown = sorted(groups, key=lambda g: -g["n"])[:GROUPS_SHOWN]
        out.append({"attribute": col, "groups": shown, "group_count": len(groups), "largest_gap": gap})
    return out


def _thumbnail(array: np.ndarray) -> str:
    import base64

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _audit_thumbnail(storage: Storage, key: str, size: int) -> str | None:
    try:
        return _thumbnail(decode_resize(read_image(storage, key), size))
    except (FileNotFoundError, OSError, ValueError) as exc:  # a missing or undecodable image: no thumbnail
        log.warning("label audit thumbnail of %s: %s", key, exc)
        return None


def read_audit(storage: Storage, run_key: str) -> pd.DataFrame | None:
    """The label audit's table (training.label_audit writes it), or None where the audit did not run."""
    key = layout.label_audit_key(run_key)
    if not storage.exists(key):
        return None
    return tables.read_csv(io.BytesIO(get_recorded(storage, key)), keep_default_na=False)


def _label_audit_section(storage: Storage, run_key: str, settings: Settings, summary: dict | None,
                         shown: int = 24) -> dict | None:  # fmt: skip
    table = read_audit(storage, run_key)
    if table is None:
        return None
    size = settings.label_audit_spec.image_size
    top = []
    for row in table.head(shown).itertuples():
        # Only the images shown are read (their stored originals, decoded as preprocessing does), so the
        # report's cost does not grow with the dataset.
        top.append({"source_path": row.source_path, "label": row.label, "split": row.split,
                    "prob_male": float(row.prob_male), "p_given_label": float(row.p_given_label),
                    "thumbnail": _audit_thumbnail(storage, row.key, size)})  # fmt: skip
    return {"summary": summary or {}, "top": top, "images": len(table),
            "below_10": int((table["p_given_label"] < 0.1).sum()),
            "below_50": int((table["p_given_label"] < 0.5).sum())}  # fmt: skip


def _external_sets(storage: Storage, run_key: str) -> list[dict]:
    return [
        json.loads(storage.get_bytes(k)) for k in storage.list(layout.external_prefix(run_key)) if k.endswith(".json")
    ]


def build_report(
    storage: Storage,
    *,
    run_key: str,
    settings: Settings,
    dataset: dict,
    validation: dict,
    split_key: str,
    task_durations: dict | None = None,
    run_id: str | None = None,
    label_audit: dict | None = None,
    repeat_split_keys: list[str] | None = None,
    ensemble_skipped: str | None = None,
) -> dict:
    """Write report.html and results.json for a run; returns their URIs and the headline numbers.
    `ensemble_skipped`: why the run made no ensemble (pipeline.skip_reason), said in the report.

    Every per-image section reads repeat 0 (the run's own folder); with repeats, Table 1 shows the
    mean over the repeats with its 95% t-interval, and the repeats section the rest."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    paper = json.loads(include_path("paper_table1.json").read_text())
    models = _reported_models(storage, run_key, settings)
    outputs = {m: load_model_outputs(storage, run_key, m) for m in models}
    repeats = _repeats_section(storage, run_key, settings, models, repeat_split_keys or [split_key])
    warnings = _health(storage, run_key, settings, models, outputs)
    flags = health.flag_summary(warnings)
    ensemble = _ensemble_members(storage, run_key, settings, outputs)
    for name, flag in flags.items():  # what the ensemble did with each flagged model, per repeat
        flag["left_out_of_ensemble"] = [e["repeat"] for e in ensemble or [] if name in e["excluded"]]
        flag["kept_in_ensemble"] = [e["repeat"] for e in ensemble or [] if e["all_flagged"] and name in e["members"]]
    manifest = read_manifest(storage, split_key)
    split_counts = count_splits(manifest)
    sha_of_key = dict(zip(manifest["key"], manifest["sha256"], strict=True))
    attributes = read_attributes(storage, dataset["dataset_id"])

    rows, per_model, test_preds = [], {}, {}
    for name, out in outputs.items():
        met, hist, preds = out["metrics"], out["history"], out["predictions"]
        test = preds[preds["split"] == "test"].sort_values("key")
        test_preds[name] = _test_predictions(preds)
        _, y_true, y_pred = test_preds[name]
        ci = bootstrap_ci(y_true, y_pred, seed=settings.seed)
        ref = paper["models"].get(name)  # None: a model the study did not train (and the ensemble)
        t = met["test"]
        first = {k: v for k, v in _table_values(met).items() if k in TABLE_METRICS}
        row = {"model": name, "label": _label(name), "ours": first, "first": first, "macro": t["macro"],
               "paper": ref, "ci": ci, "roc_auc": t["roc_auc"], "repeat_ci": None, "flagged": flags.get(name)}  # fmt: skip
        if repeats:  # Table 1's "ours": the mean over the repeats, with its 95% t-interval
            summary = repeats["summary"][name]
            row["ours"] = {k: summary[k]["mean"] for k in TABLE_METRICS}
            row["repeat_ci"] = {k: [summary[k]["ci_low"], summary[k]["ci_high"]] for k in TABLE_METRICS}
        rows.append(row)
        if name == ENSEMBLE:
            continue  # no training history, parameters or device of its own
        recalls = t["per_class_recall"]
        per_model[name] = {
            "label": _label(name),
            "metrics": met,
            "plots": _plots(hist, t["confusion_matrix"], y_true, test["prob_male"].to_numpy(), _label(name)),
            "recall_gap": recalls["female"] - recalls["male"],
            # training.loop.recalibrate_batchnorm's effect on the last epoch's validation accuracy, if it ran
            "recalibration": hist[-1] if hist and "batchnorm_recalibrated_on" in hist[-1] else None,
            "groups": _group_accuracy(test.assign(sha256=test["key"].map(sha_of_key)), attributes),
        }

    comparisons = _mcnemar_pairs(test_preds)

    totals = {c: sum(split_counts.get(s, {}).get(c, 0) for s in split_counts) for c in CLASSES}
    balance = {
        "splits": split_counts,
        "totals": totals,
        "imbalance_ratio": max(totals.values()) / max(min(totals.values()), 1),
    }
    results = {
        "run_id": run_id,
        "run_key": run_key,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "dataset": dataset,
        "settings": settings.to_dict(),
        "validation": validation,
        "class_balance": balance,
        "warnings": warnings,
        "flagged": flags,
        "health_rules": {
            "alpha": health.ALPHA,
            "nearly_none": health.NEARLY_NONE,
            "gap_tolerance": health.GAP_TOLERANCE,
        },  # fmt: skip
        "ensemble": ensemble,
        "ensemble_skipped": None if ensemble else ensemble_skipped,
        "table": rows,
        "setup": _setup_comparison(settings),
        "repeats": repeats,
        "comparisons": comparisons,
        "recall_gaps": {m: v["recall_gap"] for m, v in per_model.items()},
        "group_accuracy": {m: v["groups"] for m, v in per_model.items()},
        "external": _external_sets(storage, run_key),
        "task_durations": task_durations or {},
        "environment": {
            "code_version": code_version(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "machine": platform.machine(),
            "devices": sorted({v["metrics"]["device"] for v in per_model.values()}),
        },  # fmt: skip
    }
    audit = _label_audit_section(storage, run_key, settings, label_audit)
    results["label_audit"] = {k: v for k, v in (audit or {}).items() if k != "top"} | {
        "top": [{k: v for k, v in t.items() if k != "thumbnail"} for t in (audit or {}).get("top", [])]
    }
    env = Environment(loader=FileSystemLoader(include_path()), autoescape=select_autoescape(["html", "j2"]))
    html = env.get_template("report.html.j2").render(
        r=results, paper=paper, per_model=per_model, alpha=SIGNIFICANCE, audit=audit,
        synthetic_accuracy={row["model"]: row["ours"]["test_accuracy"] for row in rows},
        labels={name: _label(name) for name in [*model_names(), ENSEMBLE]},
        settings_json=json.dumps(settings.to_dict(), indent=1, sort_keys=True),
        profile_description=PROFILES[settings.profile].description,
    )  # fmt: skip
    storage.put_bytes(layout.results_key(run_key), json.dumps(results, indent=1, default=str).encode())
    storage.put_bytes(layout.report_key(run_key), html.encode())
    log.info("report written to %s", storage.url(layout.report_key(run_key)))
    return {
        "report_uri": storage.url(layout.report_key(run_key)),
        "results_uri": storage.url(layout.results_key(run_key)),
        "test_accuracy": {r["model"]: r["ours"]["test_accuracy"] for r in rows},
    }
