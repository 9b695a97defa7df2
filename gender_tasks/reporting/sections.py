"""The report's sections, each a function of data already read: nothing here touches storage.

`report.gather_inputs` reads a run's outputs into a `ReportInputs`; the functions below turn it into
results.json's parts (small dicts) and the page's HTML fragments, and `report.build_report` joins them.
Tests build the sections from stored fixtures without training anything.

The HTML: `include/report.html.j2` holds one Jinja2 macro per section (`PAGE` is their order on the
page); `render_section(name, context)` calls one with the arguments it names, taken from the
context `page_context` builds. Jinja2 autoescaping keeps text that comes from data (file names,
labels, settings) from injecting markup. Plots are inline SVG (matplotlib).
"""

from __future__ import annotations

import functools
import html
import io
import itertools
import json
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..data.split import split_counts as count_splits
from ..evaluation import health
from ..evaluation.metrics import encode_labels
from ..evaluation.repeats import pairwise_corrected_tests, rank_first_counts, summarise_repeats
from ..evaluation.stats import bootstrap_ci, mcnemar
from ..models.registry import get_model_spec, model_names
from ..resources import include_path
from ..settings import CLASSES, ENSEMBLE, PROFILES, Settings, resolve_settings
from .access import mcnemar_verdict

SIGNIFICANCE = 0.05
GROUPS_SHOWN = 20  # per attribute, the largest
ROC_POINTS = 400  # vertices of a plotted ROC curve, whatever the test set's size
AUDIT_SHOWN = 24  # the label audit's most suspicious images, shown as thumbnails
# Their size in px, decoded at and shown at (include/report.html.j2 takes it as `thumbnail_px`), whatever the audit
# model's input size (32 px in the cpu profile: too coarse for a reader to judge a face by). JPEG, as the scoring
# summary's: about 4 KB a face against 19 KB as PNG, on a page that carries 24 of them.
AUDIT_THUMBNAIL_PX = 96

TABLE_METRICS = ("train_accuracy", "test_accuracy", "precision", "recall", "f1")
INTERVAL_METHOD = "95% t-interval of the mean on the logit scale, transformed back (inside [0, 1])"
MIN_REPEATS_FOR_INTERVALS = 3  # below this, an interval over repeats rests on one degree of freedom

# The page, top to bottom: the macros of include/report.html.j2 that build_report joins.
PAGE = ("page_start", "warnings", "small_splits", "contents", "table1", "ensemble", "table1_notes", "uncertainty",
        "repeats", "model_cards", "class_balance", "group_accuracy", "label_audit", "external", "validation",
        "metadata", "page_end")  # fmt: skip


@dataclass
class ReportInputs:
    """Everything a report is made from, as read from storage (report.gather_inputs).

    `outputs[r][model]` is one model's {"metrics", "history", "predictions"} in repeat r (repeat 0 is the
    run's own folder, which every per-image section reads); `ensemble_metrics[r]` the ensemble's
    metrics.json in repeat r, or None where the run made no ensemble. `manifest` is repeat 0's split,
    `repeat_split_counts` the class counts per split of the first repeat's split (the corrected t-test's
    n_train and n_test). `audit_table` is the label audit's table (None where it did not run) and
    `audit_thumbnails` the data URIs of its first AUDIT_SHOWN images (None for an unreadable one).
    """

    run_key: str
    settings: Settings
    dataset: dict
    validation: dict
    paper: dict
    outputs: list[dict[str, dict]]
    ensemble_metrics: list[dict] | None
    manifest: pd.DataFrame
    repeat_split_counts: dict[str, dict[str, int]]
    attributes: pd.DataFrame | None
    audit_table: pd.DataFrame | None
    audit_thumbnails: list[str | None]
    external: list[dict]
    code_version: str
    generated_at: str
    platform: dict[str, str]
    run_id: str | None = None
    task_durations: dict = field(default_factory=dict)
    label_audit: dict | None = None  # the label audit task's summary
    ensemble_skipped: str | None = None  # why the run made no ensemble (pipeline.skip_reason)

    @property
    def models(self) -> list[str]:
        """The reported models: the run's, then the ensemble where the run made one."""
        return list(self.outputs[0])


def label(model_name: str) -> str:
    return "Ensemble (weighted mean probability)" if model_name == ENSEMBLE else get_model_spec(model_name).display_name


# --- health and the ensemble -----------------------------------------------------------------------------


def health_findings(inputs: ReportInputs) -> list[dict]:
    """Every health finding (evaluation.health) of every reported model in every repeat."""
    findings = []
    for r, outputs in enumerate(inputs.outputs):
        for m, out in outputs.items():
            findings += health.check_predictions(out["predictions"], out["metrics"].get("train_accuracy"),
                                                 model=m, repeat=r)  # fmt: skip
    return findings


def ensemble_members(inputs: ReportInputs) -> list[dict] | None:
    """Per repeat: the ensemble's members, weights and the models it left out (its metrics.json)."""
    if inputs.ensemble_metrics is None:
        return None
    out = []
    for r, met in enumerate(inputs.ensemble_metrics):
        members = met["members"]
        out.append({"repeat": r, "members": members, "labels": [label(m) for m in members],
                    "weights": met.get("weights", [1 / len(members)] * len(members)),
                    "excluded": met.get("excluded", {}), "all_flagged": met.get("all_flagged", False)})  # fmt: skip
    return out


def flagged_models(warnings: list[dict], ensemble: list[dict] | None) -> dict[str, dict]:
    """health.flag_summary of the findings, with what the ensemble did with each flagged model, per repeat."""
    flags = health.flag_summary(warnings)
    for name, flag in flags.items():
        flag["left_out_of_ensemble"] = [e["repeat"] for e in ensemble or [] if name in e["excluded"]]
        flag["kept_in_ensemble"] = [e["repeat"] for e in ensemble or [] if e["all_flagged"] and name in e["members"]]
    return flags


def health_rules() -> dict:
    return {"alpha": health.ALPHA, "nearly_none": health.NEARLY_NONE, "gap_tolerance": health.GAP_TOLERANCE}


# --- Table 1, its uncertainty and the paired tests ----------------------------------------------------------


def table_values(metrics: dict) -> dict:
    t = metrics["test"]
    return {"train_accuracy": metrics["train_accuracy"], "test_accuracy": t["accuracy"],
            "precision": t["weighted"]["precision"], "recall": t["weighted"]["recall"], "f1": t["weighted"]["f1"],
            "roc_auc": t["roc_auc"]}  # fmt: skip


def predictions_on_test(preds: pd.DataFrame) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The test split's keys, true and predicted classes (0/1), in key order."""
    test = preds[preds["split"] == "test"].sort_values("key")
    return test["key"].tolist(), encode_labels(test["label"]), encode_labels(test["predicted"])


def mcnemar_pairs(test_preds: dict) -> list[dict]:
    """McNemar for every pair of models scored on the same test images."""
    out = []
    for a, b in itertools.combinations(test_preds, 2):
        keys_a, y, pa = test_preds[a]
        keys_b, _, pb = test_preds[b]
        if keys_a != keys_b:
            continue  # different test sets cannot be paired
        res = mcnemar(y, pa, pb)
        acc_a, acc_b = float((pa == y).mean()), float((pb == y).mean())
        significant = res["p_value"] < SIGNIFICANCE
        out.append({"a": label(a), "b": label(b), "acc_diff": acc_a - acc_b, **res, "significant": significant,
                    "verdict": mcnemar_verdict(res["only_a_right"], res["only_b_right"], significant)})  # fmt: skip
    return out


def comparisons(inputs: ReportInputs) -> list[dict]:
    """The per-run McNemar comparisons, on repeat 0's test images."""
    return mcnemar_pairs({m: predictions_on_test(o["predictions"]) for m, o in inputs.outputs[0].items()})


def table1_rows(inputs: ReportInputs, flags: dict, repeats: dict | None) -> list[dict]:
    """Table 1: each model's repeat-0 numbers (with bootstrap intervals over the test images) beside the
    study's; with repeats, "ours" is the mean over the repeats with its 95% t-interval."""
    rows = []
    for name, out in inputs.outputs[0].items():
        met = out["metrics"]
        _, y_true, y_pred = predictions_on_test(out["predictions"])
        ci = bootstrap_ci(y_true, y_pred, seed=inputs.settings.seed)
        ref = inputs.paper["models"].get(name)  # None: a model the study did not train (and the ensemble)
        t = met["test"]
        first = {k: v for k, v in table_values(met).items() if k in TABLE_METRICS}
        row = {"model": name, "label": label(name), "ours": first, "first": first, "macro": t["macro"],
               "paper": ref, "ci": ci, "roc_auc": t["roc_auc"], "repeat_ci": None, "flagged": flags.get(name)}  # fmt: skip
        if repeats:
            summary = repeats["summary"][name]
            row["ours"] = {k: summary[k]["mean"] for k in TABLE_METRICS}
            row["repeat_ci"] = {k: [summary[k]["ci_low"], summary[k]["ci_high"]] for k in TABLE_METRICS}
        rows.append(row)
    return rows


def repeats_section(inputs: ReportInputs) -> dict | None:
    """Over the repeats (seed + r, each its own split): mean, std, range and t-interval per model and
    metric, how often each model ranks first, Nadeau & Bengio's corrected resampled t-test per pair, and
    in how many repeats McNemar's test called each pair significant. None for a single repeat."""
    settings = inputs.settings
    if settings.repeats < 2:
        return None
    per_repeat, mcnemar_hits = [], {}
    for outputs in inputs.outputs:
        per_repeat.append({m: table_values(o["metrics"]) for m, o in outputs.items()})
        for c in mcnemar_pairs({m: predictions_on_test(o["predictions"]) for m, o in outputs.items()}):
            mcnemar_hits[(c["a"], c["b"])] = mcnemar_hits.get((c["a"], c["b"]), 0) + int(c["significant"])
    counts = inputs.repeat_split_counts
    n_train, n_test = (sum(counts.get(s, {}).values()) for s in ("train", "test"))
    tests = pairwise_corrected_tests(per_repeat, n_train=n_train, n_test=n_test)
    rank_first = rank_first_counts(per_repeat)
    for t in tests:
        t["significant"] = not math.isnan(t["p"]) and bool(t["p"] < SIGNIFICANCE)  # NaN: not testable
        t["mcnemar_significant_repeats"] = mcnemar_hits.get((label(t["a"]), label(t["b"])), 0)
        t["a_label"], t["b_label"] = label(t["a"]), label(t["b"])
    return {"repeats": settings.repeats, "seeds": [settings.seed + r for r in range(settings.repeats)],
            "summary": summarise_repeats(per_repeat, n_images=n_test), "interval": INTERVAL_METHOD,
            "interval_means_little": settings.repeats < MIN_REPEATS_FOR_INTERVALS,
            "rank_first": {"alone": rank_first["alone"], "tied": rank_first["tied"]}, "ties": rank_first["ties"],
            "corrected_tests": tests, "n_train": n_train, "n_test": n_test, "per_repeat": per_repeat}  # fmt: skip


def describe_recipe(settings: Settings, trained_epochs: dict[str, int] | None = None) -> dict[str, str]:
    """The setup table's column for `settings`; `trained_epochs` (each model's metrics.json "epochs") adds the
    epochs a model trained where they differ from its plan's (raised to its min_steps on a small split)."""
    r, lr = settings.recipe, settings.learning_rate
    trained = trained_epochs or {}

    def epochs(m: str, p) -> str:
        text = f"{label(m)} {p.epochs} ({p.freeze_epochs})"
        if trained.get(m, p.epochs) != p.epochs:
            text += f", trained {trained[m]}" + (f" (its minimum of {p.min_steps} steps)" if p.min_steps else "")
        return text

    optimiser = f"{'AdamW' if r.optimizer == 'adamw' else 'Adam'}, learning rate {lr:g}"
    if r.weight_decay:
        optimiser += f", weight decay {r.weight_decay:g}"
    if any(p.freeze_epochs for p in settings.per_model.values()):
        optimiser += f" (fine-tuning {settings.fine_tune_learning_rate:g})"
    schedule = ("constant" if r.schedule == "constant" else
                f"per step: linear warm-up over {r.warmup_fraction:.0%} of the steps, then cosine to 0")  # fmt: skip
    return {
        "Weights": settings.weights,
        "Input size (px)": ", ".join(f"{label(m)} {p.image_size}" for m, p in settings.per_model.items()),
        "Epochs (frozen)": ", ".join(epochs(m, p) for m, p in settings.per_model.items()),
        "Fewest optimizer steps": ", ".join(f"{label(m)} {p.min_steps}" for m, p in settings.per_model.items()
                                            if p.min_steps) or "no minimum",
        "Batch": str(settings.batch_size),
        "Optimiser": optimiser,
        "Schedule": schedule,
        "Loss": "BCE" + (f", label smoothing {r.label_smoothing:g}" if r.label_smoothing else "")
                + (", each class weighted to count alike" if r.class_weighting == "balanced" else ""),
        "Augmentation": "horizontal flips" if r.augmentation == "flip" else "flips, rotation ±10°, zoom ±10 %",
        "Test-time augmentation": "mean of the image and its mirror" if r.tta else "none",
        "Weights kept": "last epoch",
    }  # fmt: skip


def setup_comparison(settings: Settings, trained_epochs: dict[str, int] | None = None) -> list[dict]:
    """This run's training setup beside the study's (the `paper` profile) for Table 1's caption."""
    study = describe_recipe(resolve_settings({"profile": "paper", "models": list(settings.models)}))
    ours = describe_recipe(settings, trained_epochs)
    return [{"setting": k, "ours": ours[k], "study": study[k], "same": ours[k] == study[k]} for k in ours]


# --- per model: plots, recall gap, accuracy per group ---------------------------------------------------


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
    title = html.escape(title, quote=True)
    return f'{svg[: end - 1]} role="img" aria-label="{title}"><title>{title}</title>{svg[end:]}'


def plots(history: list[dict], cm: list[list[int]], y_true, prob, title: str = "") -> dict[str, str]:
    """Accuracy and loss per epoch, the confusion matrix and the ROC curve, as inline SVG."""
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
    curves = _svg(fig, f"{title}: accuracy and loss per epoch, train and validation".lstrip(": "))

    fig, ax = plt.subplots(figsize=(2.3, 2.2))
    arr = np.asarray(cm)
    ax.imshow(arr, cmap="Blues")
    for (i, j), v in np.ndenumerate(arr):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > arr.max() / 2 else "black")
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=CLASSES, yticklabels=CLASSES, xlabel="predicted", ylabel="true")
    ax.set_title("Confusion matrix (test)")
    cells = ", ".join(f"true {CLASSES[i]} predicted {CLASSES[j]}: {v}" for (i, j), v in np.ndenumerate(arr))
    confusion = _svg(fig, f"{title}: confusion matrix on the test images ({cells})".lstrip(": "))

    fig, ax = plt.subplots(figsize=(2.3, 2.2))
    if len(set(np.asarray(y_true).tolist())) == 2:
        fpr, tpr, _ = roc_curve(y_true, prob)
        keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), ROC_POINTS)).round().astype(int))
        ax.plot(fpr[keep], tpr[keep])  # thinned: the SVG's size does not grow with the test set
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (test, male = positive)")
    roc = _svg(fig, f"{title}: ROC curve on the test images, male as the positive class".lstrip(": "))
    return {"curves": curves, "confusion": confusion, "roc": roc}


def group_accuracy(test: pd.DataFrame, attributes: pd.DataFrame | None, min_n: int = 10) -> list[dict]:
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


def model_cards(inputs: ReportInputs, *, with_plots: bool = True) -> dict[str, dict]:
    """Per trained model (not the ensemble, which has no history, parameters or device of its own): its
    metrics, plots, female-minus-male recall gap, BatchNorm recalibration and accuracy per group."""
    sha_of_key = dict(zip(inputs.manifest["key"], inputs.manifest["sha256"], strict=True))
    cards = {}
    for name, out in inputs.outputs[0].items():
        if name == ENSEMBLE:
            continue
        met, hist, preds = out["metrics"], out["history"], out["predictions"]
        test = preds[preds["split"] == "test"].sort_values("key")
        t = met["test"]
        _, y_true, _ = predictions_on_test(preds)
        recalls = t["per_class_recall"]
        cards[name] = {
            "label": label(name),
            "metrics": met,
            "plots": plots(hist, t["confusion_matrix"], y_true, test["prob_male"].to_numpy(), label(name))
            if with_plots
            else {},
            "recall_gap": recalls["female"] - recalls["male"],
            # training.loop.recalibrate_batchnorm's effect on the last epoch's validation accuracy, if it ran
            "recalibration": hist[-1] if hist and "batchnorm_recalibrated_on" in hist[-1] else None,
            "groups": group_accuracy(test.assign(sha256=test["key"].map(sha_of_key)), inputs.attributes),
        }
    return cards


# --- class balance, the label audit, metadata --------------------------------------------------------------


def class_balance(manifest: pd.DataFrame) -> dict:
    """Images per split and class, the totals, and the larger class over the smaller."""
    split_counts = count_splits(manifest)
    totals = {c: sum(split_counts.get(s, {}).get(c, 0) for s in split_counts) for c in CLASSES}
    return {
        "splits": split_counts,
        "totals": totals,
        "imbalance_ratio": max(totals.values()) / max(min(totals.values()), 1),
    }


# Under this many images in the validation or the test split, the page says how little one image weighs there.
SMALL_SPLIT = 100


def small_splits(balance: dict) -> dict | None:
    """The validation and test splits' sizes where either holds under SMALL_SPLIT images, else None. The health
    checks and the ensemble's choice read validation and Table 1 reads test: at 30 images one image is 0.033 of
    accuracy, and a model can pass the checks on one split and score near chance on the other
    (bench/RESULTS.md, "The warm-up length")."""
    sizes = {s: sum(balance["splits"].get(s, {}).values()) for s in ("val", "test")}
    smallest = min(sizes.values())
    if smallest >= SMALL_SPLIT:
        return None
    return {"validation_images": sizes["val"], "test_images": sizes["test"], "one_image": 1 / max(smallest, 1),
            "threshold": SMALL_SPLIT}  # fmt: skip


def label_audit_section(inputs: ReportInputs) -> dict | None:
    """The label audit's most suspicious images (with thumbnails) and counts; None where it did not run."""
    table = inputs.audit_table
    if table is None:
        return None
    top = [{"source_path": row.source_path, "label": row.label, "split": row.split,
            "prob_male": float(row.prob_male), "p_given_label": float(row.p_given_label),
            # the ranking's score (training.label_audit.label_quality); an audit stored before it has none
            "label_quality": float(row.label_quality) if hasattr(row, "label_quality") else None,
            "thumbnail": thumbnail}
           for row, thumbnail in zip(table.head(AUDIT_SHOWN).itertuples(), inputs.audit_thumbnails, strict=True)]  # fmt: skip
    return {"summary": inputs.label_audit or {}, "top": top, "images": len(table),
            "below_10": int((table["p_given_label"] < 0.1).sum()),
            "below_50": int((table["p_given_label"] < 0.5).sum())}  # fmt: skip


def label_audit_record(audit: dict | None) -> dict:
    """The audit section as results.json holds it: without the thumbnails."""
    return {k: v for k, v in (audit or {}).items() if k != "top"} | {
        "top": [{k: v for k, v in t.items() if k != "thumbnail"} for t in (audit or {}).get("top", [])]
    }


def environment(inputs: ReportInputs, cards: dict[str, dict]) -> dict:
    return {"code_version": inputs.code_version, **inputs.platform,
            "devices": sorted({v["metrics"]["device"] for v in cards.values()})}  # fmt: skip


# --- the whole: results.json and the page ------------------------------------------------------------------


@dataclass
class Report:
    """A built report: results.json's dict, and what the page shows beyond it."""

    results: dict
    cards: dict[str, dict]
    audit: dict | None


def build_sections(inputs: ReportInputs, *, with_plots: bool = True) -> Report:
    """Every section of the report, from its inputs."""
    repeats = repeats_section(inputs)
    warnings = health_findings(inputs)
    ensemble = ensemble_members(inputs)
    flags = flagged_models(warnings, ensemble)
    rows = table1_rows(inputs, flags, repeats)
    cards = model_cards(inputs, with_plots=with_plots)
    audit = label_audit_section(inputs)
    balance = class_balance(inputs.manifest)
    results = {
        "run_id": inputs.run_id,
        "run_key": inputs.run_key,
        "generated_at": inputs.generated_at,
        "dataset": inputs.dataset,
        "settings": inputs.settings.to_dict(),
        "validation": inputs.validation,
        "class_balance": balance,
        "small_splits": small_splits(balance),
        "warnings": warnings,
        "flagged": flags,
        "health_rules": health_rules(),
        "ensemble": ensemble,
        "ensemble_skipped": None if ensemble else inputs.ensemble_skipped,
        "table": rows,
        "setup": setup_comparison(
            inputs.settings,
            {m: o["metrics"]["epochs"] for m, o in inputs.outputs[0].items() if "epochs" in o.get("metrics", {})},
        ),
        "repeats": repeats,
        "comparisons": comparisons(inputs),
        "recall_gaps": {m: v["recall_gap"] for m, v in cards.items()},
        "group_accuracy": {m: v["groups"] for m, v in cards.items()},
        "external": inputs.external,
        "task_durations": inputs.task_durations,
        "environment": environment(inputs, cards),
        "label_audit": label_audit_record(audit),
    }
    return Report(results=results, cards=cards, audit=audit)


def results_json(report: Report) -> bytes:
    return json.dumps(report.results, indent=1, default=str).encode()


def page_context(report: Report, inputs: ReportInputs) -> dict:
    """What the page's macros may take, by name."""
    r = report.results
    return {"r": r, "paper": inputs.paper, "per_model": report.cards, "alpha": SIGNIFICANCE, "audit": report.audit,
            "thumbnail_px": AUDIT_THUMBNAIL_PX,
            "synthetic_accuracy": {row["model"]: row["ours"]["test_accuracy"] for row in r["table"]},
            "labels": {name: label(name) for name in [*model_names(), ENSEMBLE]},
            "settings_json": json.dumps(inputs.settings.to_dict(), indent=1, sort_keys=True),
            "profile_description": PROFILES[inputs.settings.profile].description}  # fmt: skip


@functools.cache
def _macros():
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(loader=FileSystemLoader(include_path()), autoescape=select_autoescape(["html", "j2"]))
    return env.get_template("report.html.j2").module


def render_section(name: str, context: dict) -> str:
    """One section of the page as HTML: its macro, given the context's values of the arguments it names."""
    macro = getattr(_macros(), name)
    return str(macro(**{a: context[a] for a in macro.arguments}))


def render_page(context: dict) -> str:
    return "".join(render_section(name, context) for name in PAGE)
