"""Gather every model's outputs into one self-contained HTML report and machine-readable results.

    runs/<run_key>/report.html    the study's Table 1 beside ours, uncertainty, plots, audits
    runs/<run_key>/results.json   the same numbers as data

The template lives in `include/report.html.j2`; Jinja2 autoescaping keeps text that comes from
data (file names, labels, settings) from injecting markup. Plots are inline SVG (matplotlib).
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from .. import layout
from ..data.attributes import read_attributes
from ..data.images import decode_resize
from ..data.manifest import read_manifest
from ..data.split import split_counts as count_splits
from ..evaluation.metrics import encode_labels
from ..evaluation.stats import bootstrap_ci, mcnemar
from ..models.registry import get_model_spec, model_names
from ..resources import include_path
from ..settings import CLASSES, Settings
from ..storage import Storage

log = logging.getLogger(__name__)

SIGNIFICANCE = 0.05
GROUPS_SHOWN = 20  # per attribute, the largest
ROC_POINTS = 400  # vertices of a plotted ROC curve, whatever the test set's size


def _label(model_name: str) -> str:
    return get_model_spec(model_name).display_name


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    svg = buf.getvalue()
    return svg[svg.index("<svg") :]  # drop the XML prolog so it can sit inside HTML


def _plots(history: list[dict], cm: list[list[int]], y_true, prob) -> dict[str, str]:
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
    curves = _svg(fig)

    fig, ax = plt.subplots(figsize=(2.3, 2.2))
    arr = np.asarray(cm)
    ax.imshow(arr, cmap="Blues")
    for (i, j), v in np.ndenumerate(arr):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > arr.max() / 2 else "black")
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=CLASSES, yticklabels=CLASSES, xlabel="predicted", ylabel="true")
    ax.set_title("Confusion matrix (test)")
    confusion = _svg(fig)

    fig, ax = plt.subplots(figsize=(2.3, 2.2))
    if len(set(np.asarray(y_true).tolist())) == 2:
        fpr, tpr, _ = roc_curve(y_true, prob)
        keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), ROC_POINTS)).round().astype(int))
        ax.plot(fpr[keep], tpr[keep])  # thinned: the SVG's size does not grow with the test set
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (test, male = positive)")
    roc = _svg(fig)
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

    return {
        "metrics": json.loads(read("metrics.json")),
        "history": json.loads(read("history.json")),
        "predictions": pd.read_csv(io.BytesIO(read("predictions.csv")), keep_default_na=False),
    }


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
        return _thumbnail(decode_resize(storage.get_bytes(key), size))
    except (FileNotFoundError, OSError, ValueError) as exc:  # a missing or undecodable image: no thumbnail
        log.warning("label audit thumbnail of %s: %s", key, exc)
        return None


def read_audit(storage: Storage, run_key: str) -> pd.DataFrame | None:
    """The label audit's table (training.label_audit writes it), or None where the audit did not run."""
    key = layout.label_audit_key(run_key)
    if not storage.exists(key):
        return None
    return pd.read_csv(io.BytesIO(storage.get_bytes(key)), keep_default_na=False)


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
) -> dict:
    """Write report.html and results.json for a run; returns their URIs and the headline numbers."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    paper = json.loads(include_path("paper_table1.json").read_text())
    outputs = {m: load_model_outputs(storage, run_key, m) for m in settings.models}
    manifest = read_manifest(storage, split_key)
    split_counts = count_splits(manifest)
    sha_of_key = dict(zip(manifest["key"], manifest["sha256"], strict=True))
    attributes = read_attributes(storage, dataset["dataset_id"])

    rows, per_model, test_preds = [], {}, {}
    for name, out in outputs.items():
        met, hist, preds = out["metrics"], out["history"], out["predictions"]
        test = preds[preds["split"] == "test"].sort_values("key")
        y_true = encode_labels(test["label"])
        y_pred = encode_labels(test["predicted"])
        test_preds[name] = (test["key"].tolist(), y_true, y_pred)
        ci = bootstrap_ci(y_true, y_pred, seed=settings.seed)
        ref = paper["models"].get(name)  # None: a model the study did not train
        t = met["test"]
        rows.append({
            "model": name, "label": _label(name),
            "ours": {"train_accuracy": met["train_accuracy"], "test_accuracy": t["accuracy"],
                     "precision": t["weighted"]["precision"], "recall": t["weighted"]["recall"],
                     "f1": t["weighted"]["f1"]},
            "macro": t["macro"], "paper": ref, "ci": ci, "roc_auc": t["roc_auc"],
        })  # fmt: skip
        recalls = t["per_class_recall"]
        per_model[name] = {
            "label": _label(name),
            "metrics": met,
            "plots": _plots(hist, t["confusion_matrix"], y_true, test["prob_male"].to_numpy()),
            "recall_gap": recalls["female"] - recalls["male"],
            "groups": _group_accuracy(test.assign(sha256=test["key"].map(sha_of_key)), attributes),
        }

    comparisons = []
    for a, b in itertools.combinations(test_preds, 2):
        keys_a, y, pa = test_preds[a]
        keys_b, _, pb = test_preds[b]
        if keys_a != keys_b:
            continue  # different test sets cannot be paired
        res = mcnemar(y, pa, pb)
        acc_a, acc_b = float((pa == y).mean()), float((pb == y).mean())
        comparisons.append({"a": _label(a), "b": _label(b), "acc_diff": acc_a - acc_b, **res,
                            "significant": res["p_value"] < SIGNIFICANCE})  # fmt: skip

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
        "table": rows,
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
        labels={name: _label(name) for name in model_names()},
        settings_json=json.dumps(settings.to_dict(), indent=1, sort_keys=True),
    )  # fmt: skip
    storage.put_bytes(layout.results_key(run_key), json.dumps(results, indent=1, default=str).encode())
    storage.put_bytes(layout.report_key(run_key), html.encode())
    log.info("report written to %s", storage.url(layout.report_key(run_key)))
    return {
        "report_uri": storage.url(layout.report_key(run_key)),
        "results_uri": storage.url(layout.results_key(run_key)),
        "test_accuracy": {r["model"]: r["ours"]["test_accuracy"] for r in rows},
    }
