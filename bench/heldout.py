"""Held-out faces: the four models and their ensemble on faces the run never saw, simulated on the shared faces.

    .venv/bin/python bench/heldout.py --seeds 0,1,2 --out bench/heldout.jsonl
    .venv/bin/python bench/heldout.py --table bench/heldout.jsonl       # the markdown table only

Issue 19's acceptance checks the models on synthetic faces the project does not have (the best single model
at least 0.90, the ensemble at least 0.91 and not below its best member). This is the same check on faces this
machine has: each seed sets aside a held-out part of ../shared/data/generated_photos (--fraction of each
class, default 0.2, drawn at random with the seed) and runs the pipeline on the rest, as `make run` does
(`cpu` profile, the run's seed, split 70/15/15, the four models, the ensemble, the report; label audit off: it
does not change the models), with the held-out folder as the run's external evaluation set, which scores
every model and the ensemble on it (evaluation/external.py). Faces are set aside by near-duplicate group
(phash within 4 bits, the pipeline's near-duplicate distance; identical files too), so neither a held-out
face nor a near-copy of one is in the run's train, validation or test split.

Rows carry the draw (`DRAW`): bench/heldout-draw1.jsonl holds ten seeds of draw 1, which set groups aside per
class, so a group whose faces carry both labels could be split (a leak, measured in set_aside's docstring);
a rerun with --out skips only the seeds of the current draw.

`--epochs cnn=96,mobilenetv2=40` (an example: twice the plan in force, 48 and 20) trains those models with these
epochs in their `cpu` plan (their `min_steps` unchanged: on small datasets, where the minimum decides, nothing
changes), to measure a recipe on faces the run never saw. Rows record every model's planned epochs
(`plan_epochs`; rows without it were written under EARLIER_PLAN), a rerun and `--table` keep rows of other plans
apart, and `--table FILE --epochs ...` adds each column's paired difference against the rows of the plans in
force, seed by seed. `--recipe class_weighting=balanced` (KEY=VALUE,... of gender_tasks.settings.Recipe) does
the same for the `cpu` profile's recipe: rows record the recipe they trained with (`recipe`; rows without it
trained with today's recipe, RECIPE_ADDED_SINCE's fields as they were).

`--keep male=0.33` keeps that share of a class's faces in the run (drawn with the seed, after the held-out
faces are set aside; those stay as drawn), to measure on an imbalanced dataset what a user with one would get;
rows record it (`keep`) and only rows of the same --keep are read together. `--table FILE --per-class` adds
each model's held-out recall per class and balanced accuracy (the mean of the two recalls). `--keep
female=0.75,male=0.75` (one share for both classes) trains on fewer faces against the same held-out ones, and
`--curve FILE ...` prints held-out accuracy against the share of the faces trained on: a learning curve, to
judge what a run on all of the faces (which this check cannot hold any out of) would score.

`--folds 10 --seeds 0,...,9` deals the faces into ten folds once (near-duplicate groups whole, each class
spread evenly) and lets seed s hold out fold s: each run trains on 0.9 of the faces, and the ten runs hold out
every face exactly once. `--table FILE --folds 10` adds the accuracy over all the faces pooled, with an
interval over the faces; `--curve` sets it beside the learning curve's lines read at 0.9.

Each run appends one JSON line to --out (test and held-out accuracy per model and the ensemble, the
ensemble's members, the flagged models, seconds, and every model's validation, test and held-out P(male));
a rerun with the same --out skips the seeds already there. `--table FILE --rules` compares ways of choosing
the ensemble's members from those validation probabilities alone, by what each choice scores on the held-out
faces. Training on 80 % of the faces, the models are a little weaker than a run on all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_bench import SOURCE, _sources, machine, parse_epochs, set_cpu_epochs  # noqa: E402 - the bench folder's own helpers

MODELS = ("cnn", "resnet50", "inceptionv3", "mobilenetv2")
COLUMNS = (*MODELS, "ensemble")
TARGET_BEST, TARGET_ENSEMBLE = 0.90, 0.91
HELDOUT_SET = "heldout"


DRAW = 2  # rows of draw 1 (bench/heldout-draw1.jsonl) set groups aside per class: see set_aside


def near_duplicate_groups(paths: list[Path]) -> list[str]:
    """A group id per path: the split's own grouping (data/split.py) of identical files and of phashes within
    the pipeline's near-duplicate distance, chained, across the classes."""
    import pandas as pd

    from gender_tasks.data.images import phash_of_bytes
    from gender_tasks.data.near_duplicates import DEFAULT_MAX_DISTANCE
    from gender_tasks.data.split import near_duplicate_groups as split_groups
    from gender_tasks.integrity import sha256_hex

    blobs = [p.read_bytes() for p in paths]
    table = pd.DataFrame({"sha256": [sha256_hex(b) for b in blobs], "phash": [phash_of_bytes(b) for b in blobs]})
    return split_groups(table, DEFAULT_MAX_DISTANCE).tolist()


def set_aside(seed: int, fraction: float, train_dir: Path, heldout_dir: Path, source: Path = SOURCE,
              folds: int | None = None) -> dict:  # fmt: skip
    """Copy `source`'s faces into train_dir/<label>/ and heldout_dir/<label>/, whole near-duplicate groups at a
    time (a group whose faces carry both labels, too: its faces go to one side, each under its own label).
    Stratified by a group's majority label (ties: its first face's, as the split does): per class, groups drawn
    at random (seeded) until `fraction` of the class's faces are held out. With `folds` (K), `fraction` is not
    read: the groups are dealt into K folds once (the same for every seed; see fold_of) and seed s, 0 <= s < K,
    holds out fold s, so that seeds 0..K-1 hold out every face exactly once. Returns the counts per label.

    (Draw 1 drew per label, so the faces of a group with both labels could land on both sides: in the recorded
    draw-1 runs 3-70 held-out faces of 198-246 had a near-duplicate of the other label in the run's folder.)"""
    faces = _sources(source)
    members: dict[str, list[tuple[Path, str]]] = {}
    for face, group in zip(faces, near_duplicate_groups([p for p, _ in faces]), strict=True):
        members.setdefault(group, []).append(face)
    held_out: set[str] = set()
    if folds:
        if not 0 <= seed < folds:
            raise ValueError(f"seed {seed}: with {folds} folds the seeds are 0 to {folds - 1}, one per fold")
        held_out = {group for group, fold in fold_of(members, folds).items() if fold == seed}
    else:
        rng = random.Random(f"heldout-{seed}")
        for label in ("female", "male"):
            order = _shuffled_groups(members, label, rng)
            wanted, held = round(fraction * sum(len(members[g]) for g in order)), 0
            for group in order:
                if held >= wanted:
                    break
                held_out.add(group)
                held += len(members[group])
    counts = {label: {"heldout": 0, "run": 0} for label in ("female", "male")}
    for group, faces_of in members.items():
        side, target = ("heldout", heldout_dir) if group in held_out else ("run", train_dir)
        for path, label in faces_of:
            (target / label).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target / label / path.name)
            counts[label][side] += 1
    return counts


def fold_of(members: dict[str, list[tuple[Path, str]]], folds: int) -> dict[str, int]:
    """Each near-duplicate group's fold, 0 to folds - 1, stratified by the group's majority label: per class,
    the groups in a random order (seeded by the fold count alone, so every seed of a K-fold run deals the same
    folds), largest first, each to the fold that holds the fewest faces of that class so far (ties: the lowest
    fold). Every fold then holds 1/K of each class, give or take one group."""
    rng = random.Random(f"heldout-folds-{folds}")
    fold: dict[str, int] = {}
    for label in ("female", "male"):
        order = _shuffled_groups(members, label, rng)
        order.sort(key=lambda g: -len(members[g]))  # stable: equal sizes keep the random order
        held = [0] * folds
        for group in order:
            fold[group] = held.index(min(held))
            held[fold[group]] += len(members[group])
    return fold


def _shuffled_groups(members: dict[str, list[tuple[Path, str]]], label: str, rng: random.Random) -> list[str]:
    """The groups whose majority label is `label`, in an order drawn with `rng` (from their sorted ids)."""
    order = sorted(g for g, m in members.items() if _majority(m) == label)
    rng.shuffle(order)
    return order


def thin_out(run_dir: Path, keep: dict[str, float], seed: int, counts: dict) -> None:
    """Keep `share` of run_dir/<label>/'s faces for each label: share of keep (at random, seeded; the rest are
    deleted), and lower `counts[label]["run"]` to match."""
    for label, share in sorted(keep.items()):
        faces = sorted((run_dir / label).iterdir())
        random.Random(f"keep-{seed}-{label}").shuffle(faces)
        kept = round(share * len(faces))
        for face in faces[kept:]:
            face.unlink()
        counts[label]["run"] = kept


def _majority(faces: list[tuple[Path, str]]) -> str:
    labels = [label for _, label in faces]
    top = max(labels.count(label) for label in labels)
    return next(label for label in labels if labels.count(label) == top)


def one_run(seed: int, fraction: float, epochs: dict[str, int] | None = None, recipe: dict | None = None,
            keep: dict[str, float] | None = None, folds: int | None = None) -> dict:  # fmt: skip
    """In a child process: set the faces aside, run the pipeline on the rest, score the held-out part."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    from gender_tasks import layout, pipeline
    from gender_tasks.data.shards import CACHE_DIR_ENV

    set_cpu_epochs(epochs or {})
    set_cpu_recipe(recipe or {})

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="heldout-"))
    try:
        counts = set_aside(seed, fraction, work / "faces", work / HELDOUT_SET, folds=folds)
        thin_out(work / "faces", keep or {}, seed, counts)
        os.environ[CACHE_DIR_ENV] = str(work / "local-cache")
        conf = {"source": str(work / "faces"), "storage": str(work / "store"), "profile": "cpu", "seed": seed,
                "label_audit": False, "external_eval": [str(work / HELDOUT_SET)]}  # fmt: skip
        run = pipeline.prepare(conf, run_id=f"heldout-{seed}")
        for step in (pipeline.ingest, pipeline.split, pipeline.validate, pipeline.preprocess):
            run = step(run)
        trained = [pipeline.train(run, name) for name in MODELS]
        ensembled = pipeline.ensemble(run)
        external = pipeline.evaluate_external(run)
        out = pipeline.report(run, trained, external=external, ensembled=ensembled)
        results = json.loads(Path(out["results_uri"].removeprefix("file://")).read_text())
        scored = json.loads((work / "store" / layout.external_key(run["run_key"], HELDOUT_SET)).read_text())
        probabilities = _probabilities(run["run_key"], work / "store", work / HELDOUT_SET)
        ensemble = results.get("ensemble")
        first = ensemble[0] if isinstance(ensemble, list) and ensemble else ensemble or {}
        metrics = {m: json.loads((work / "store" / layout.model_file_key(run["run_key"], m, "metrics.json")).read_text())
                   for m in MODELS}  # fmt: skip
        threads = {m: metrics[m]["torch_threads"] for m in MODELS}
        distinct = set(threads.values())
        return {
            "seed": seed, "fraction": fraction, "draw": DRAW, **({"folds": folds} if folds else {}),
            "faces": counts, "heldout_images": scored["images"],
            "counts": run["split"]["counts"], "test_accuracy": out["test_accuracy"],
            "heldout_accuracy": {m: r["accuracy"] for m, r in scored["models"].items()},
            "ensemble_members": first.get("members"), "ensemble_weights": first.get("weights"),
            "flagged": sorted(results.get("flagged") or {}), "seconds": round(time.perf_counter() - started, 1),
            **({"epochs": dict(sorted(epochs.items()))} if epochs else {}),
            "plan_epochs": plan_epochs(),
            **({"recipe_changes": recipe} if recipe else {}),
            "recipe": cpu_recipe(),
            **({"keep": keep} if keep else {}),
            "machine": machine(),
            "trained_epochs": {m: metrics[m]["epochs"] for m in MODELS},
            # The thread count changes every model's numbers a little (bench/RESULTS.md): one figure when all agree.
            "torch_threads": distinct.pop() if len(distinct) == 1 else threads,
            "probabilities": probabilities,
        }  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


FRACTION = 0.2  # of each class's faces held out, by default: the one-model scripts (input_size, member_variants) use it


def train_alone(seed: int, model: str, work: Path, run_id: str) -> dict:
    """For the one-model scripts: this seed's draw of held-out faces set aside in `work` (FRACTION), the
    pipeline run on the rest as `make run` does but training only `model` (`cpu` profile, the seed, label
    audit off), and the held-out faces predicted by the stored model, as the external evaluation does (at
    its own input size). Returns the run, `pipeline.train`'s result, the store's folder, the held-out table,
    the stored model's metadata and its held-out P(male)."""
    from gender_tasks import layout, pipeline
    from gender_tasks.data.shards import CACHE_DIR_ENV
    from gender_tasks.evaluation.external import list_labeled_images, predict_streamed
    from gender_tasks.evaluation.predict import load_stored_model
    from gender_tasks.storage import open_storage

    set_aside(seed, FRACTION, work / "faces", work / HELDOUT_SET)
    os.environ[CACHE_DIR_ENV] = str(work / "local-cache")
    store = work / "store"
    conf = {"source": str(work / "faces"), "storage": str(store), "profile": "cpu", "seed": seed,
            "label_audit": False, "models": [model]}  # fmt: skip
    run = pipeline.prepare(conf, run_id=run_id)
    for step in (pipeline.ingest, pipeline.split, pipeline.validate, pipeline.preprocess):
        run = step(run)
    trained = pipeline.train(run, model)
    held = list_labeled_images(work / HELDOUT_SET, None)
    module, meta = load_stored_model(open_storage(str(store)), layout.model_prefix(run["run_key"], model))
    prob = predict_streamed(list(held["path"]), {model: (module, meta["input_sizes"])})[model]
    return {"run": run, "trained": trained, "store": store, "held": held, "module": module, "meta": meta,
            "prob": prob}  # fmt: skip


def _probabilities(run_key: str, store: Path, heldout: Path) -> dict:
    """Each model's P(male) (4 decimals) on its validation and test images (its predictions.csv) and on the
    held-out faces, with the labels (1 = male): what comparing ways of choosing an ensemble needs."""
    from gender_tasks import layout
    from gender_tasks.evaluation.external import list_labeled_images, predict_streamed
    from gender_tasks.evaluation.predict import load_stored_model
    from gender_tasks.storage import open_storage

    storage = open_storage(str(store))
    held = list_labeled_images(heldout, None)
    loaded = {}
    for m in MODELS:
        module, meta = load_stored_model(storage, layout.model_prefix(run_key, m))
        loaded[m] = (module, meta["input_sizes"])
    held_probs = predict_streamed(list(held["path"]), loaded)
    out: dict = {"heldout": {"label": [int(v == "male") for v in held["label"]]}}
    for m in MODELS:
        for split, got in split_probabilities(store, run_key, m).items():
            out.setdefault(split, {"label": got["label"]})[m] = got[m]
        out["heldout"][m] = [round(float(v), 4) for v in held_probs[m]]
    return out


def split_probabilities(store: Path, run_key: str, model: str) -> dict[str, dict[str, list]]:
    """`model`'s P(male) (4 decimals) on its validation and test images, from its predictions.csv in key
    order, with the labels (1 = male): {"val": {"label": [...], model: [...]}, "test": ...}."""
    import pandas as pd

    from gender_tasks import layout

    preds = pd.read_csv(store / layout.model_file_key(run_key, model, "predictions.csv"), keep_default_na=False)
    preds = preds.sort_values("key")
    out = {}
    for split in ("val", "test"):
        part = preds[preds["split"] == split]
        out[split] = {"label": [int(v == "male") for v in part["label"]],
                      model: [round(float(v), 4) for v in part["prob_male"]]}  # fmt: skip
    return out


# The cpu plans' epochs when the rows that do not record theirs (plan_epochs) were written.
EARLIER_PLAN = {"cnn": 12, "resnet50": 5, "inceptionv3": 5, "mobilenetv2": 5}


def plan_epochs(epochs: dict[str, int] | None = None) -> dict[str, int]:
    """Each model's `cpu` epochs as registered now, with these --epochs over them."""
    from gender_tasks.models.registry import get_model_spec

    return {m: (epochs or {}).get(m, get_model_spec(m).profiles["cpu"].epochs) for m in MODELS}


def _row_plan(row: dict) -> dict[str, int]:
    return row.get("plan_epochs") or {**EARLIER_PLAN, **row.get("epochs", {})}


# The `cpu` recipe's fields when the rows that do not record theirs (`recipe`) were written: today's fields,
# with every field added since at the value that reproduces the training of those rows.
RECIPE_ADDED_SINCE = {"class_weighting": "none"}


def cpu_recipe(changes: dict | None = None) -> dict:
    """The `cpu` profile's recipe as registered now (with these --recipe changes over it), as a dict."""
    import dataclasses

    from gender_tasks.settings.profiles import PROFILES

    return {**dataclasses.asdict(PROFILES["cpu"].recipe), **(changes or {})}


def _row_recipe(row: dict) -> dict:
    return row.get("recipe") or {**cpu_recipe(), **RECIPE_ADDED_SINCE}


def set_cpu_profile(changes: dict) -> None:
    """The `cpu` profile with these of its fields changed (learning_rate, batch_size, recipe, ...), in this
    process only."""
    import dataclasses

    from gender_tasks.settings.profiles import PROFILES

    if changes:
        PROFILES["cpu"] = dataclasses.replace(PROFILES["cpu"], **changes)


def set_cpu_recipe(changes: dict) -> None:
    """The `cpu` profile trains with these recipe fields changed, in this process only."""
    import dataclasses

    from gender_tasks.settings.profiles import PROFILES

    if changes:
        set_cpu_profile({"recipe": dataclasses.replace(PROFILES["cpu"].recipe, **changes)})


def parse_keep(parser, text: str) -> dict[str, float]:
    """--keep LABEL=SHARE,... as {label: share}: a usage error naming the item unless LABEL is female or male
    and SHARE a number in (0, 1]."""
    keep = {}
    for item in filter(None, text.split(",")):
        label, sep, share = item.partition("=")
        try:
            value = float(share)
        except ValueError:
            value = -1.0
        if not sep or label not in ("female", "male") or not 0 < value <= 1:
            parser.error(f"--keep: expected LABEL=SHARE with LABEL female or male and SHARE in (0, 1], got {item!r}")
        keep[label] = value
    return keep


def parse_recipe(parser, text: str) -> dict:
    """--recipe KEY=VALUE,... as {field: value} of gender_tasks.settings.Recipe, each value of its field's type
    (true/false for a flag): a usage error naming the item otherwise."""
    from gender_tasks.settings.profiles import Recipe

    defaults = Recipe()
    changes = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        current = getattr(defaults, key, None)
        try:
            if not sep or current is None:
                raise ValueError
            if isinstance(current, bool):
                if value not in ("true", "false"):
                    raise ValueError
                changes[key] = value == "true"
            else:
                changes[key] = type(current)(value)
        except ValueError:
            fields = ", ".join(f.name for f in __import__("dataclasses").fields(Recipe))
            parser.error(f"--recipe: expected KEY=VALUE with KEY one of {fields}, got {item!r}")
    return changes


def _rows_of(out: Path) -> list[dict]:
    """Every row of an --out file, in the order written."""
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


def _done(out: Path, fraction: float, draw: int | None = DRAW, epochs: dict[str, int] | None = None,
          recipe: dict | None = None, keep: dict[str, float] | None = None,
          folds: int | None = None) -> dict[int, dict]:  # fmt: skip
    """The finished runs of `out` at `fraction`, of draw `draw` (None: any; rows without one are draw 1),
    trained with the plans and recipe in force with these --epochs and --recipe over them (the epochs and
    recipe the row trained with, not the options it was run with: after a change of plan, its earlier rows
    are `--epochs` of the old values); with `folds`, only the rows of that K-fold deal (and without, none)."""
    rows = _trained_as(_rows_of(out) if out.exists() else [], draw, epochs, recipe)
    return {r["seed"]: r for r in rows if r["fraction"] == fraction and r.get("keep", {}) == (keep or {})
            and r.get("folds") == folds}  # fmt: skip


def _trained_as(rows: list[dict], draw: int | None = DRAW, epochs: dict[str, int] | None = None,
                recipe: dict | None = None) -> list[dict]:  # fmt: skip
    """The finished rows of draw `draw` (None: any) trained with the plans and recipe in force with these
    --epochs and --recipe over them (see _done)."""
    wanted, wanted_recipe = plan_epochs(epochs), cpu_recipe(recipe)
    return [r for r in rows if "error" not in r and draw in (None, r.get("draw", 1)) and _row_plan(r) == wanted
            and _row_recipe(r) == wanted_recipe]  # fmt: skip


def paired(base: dict[int, dict], rows: dict[int, dict]) -> str:
    """Markdown: per column, the mean held-out accuracy of `rows` and of `base` over the seeds both have, and
    the paired difference with its t statistic and range."""
    seeds = sorted(set(base) & set(rows))
    if not seeds:
        return "No seeds in common with the shipped plan's rows."
    kinds = {
        json.dumps(r.get("machine"), sort_keys=True) for r in (*(base[s] for s in seeds), *(rows[s] for s in seeds))
    }
    caveat = ("" if len(kinds) == 1 and "null" not in kinds else
              " Not all from one recorded kind of machine: another CPU moves models by a face or two, so the columns "
              "whose training did not change show that noise.")  # fmt: skip
    lines = [f"Paired over seeds {', '.join(map(str, seeds))} (held-out accuracy).{caveat}", "",
             "| column | these rows | shipped plan | difference | t | range |", "|---|---|---|---|---|---|"]  # fmt: skip
    for c in COLUMNS:
        new = [rows[s]["heldout_accuracy"][c] for s in seeds]
        old = [base[s]["heldout_accuracy"][c] for s in seeds]
        diff = [a - b for a, b in zip(new, old, strict=True)]
        lines.append(f"| {c} | {statistics.mean(new):.3f} | {statistics.mean(old):.3f} | {statistics.mean(diff):+.3f} "
                     f"| {t_text(diff)} | {min(diff):+.3f} to {max(diff):+.3f} |")  # fmt: skip
    return "\n".join(lines)


def t_text(diff: list[float]) -> str:
    """The paired t statistic of per-seed differences, to one decimal; without spread there is no t: the same
    to the face in every seed (a control), or the same shift in all."""
    spread = statistics.stdev(diff) if len(diff) > 1 else 0.0
    if not spread:
        return "identical in every seed" if not any(diff) else "the same in every seed"
    return f"{statistics.mean(diff) / (spread / len(diff) ** 0.5):.1f}"


def per_class_table(rows: list[dict]) -> str:
    """Markdown: per column, the mean over the rows of held-out recall of each class (threshold 0.5) and of
    balanced accuracy, from the recorded probabilities (the ensemble's: its members' weighted mean)."""
    sums: dict[str, list[list[float]]] = {c: [] for c in COLUMNS}
    for r in rows:
        held = r["probabilities"]["heldout"]
        labels = np.asarray(held["label"])
        members = r.get("ensemble_members") or []
        weights = r.get("ensemble_weights") or [1.0] * len(members)
        total = sum(weights)  # stored weights are rounded: scaled to sum to 1, as the ensemble's own mean
        probs = {m: np.asarray(held[m]) for m in MODELS}
        probs["ensemble"] = sum(w / total * probs[m] for m, w in zip(members, weights, strict=True))
        for c in COLUMNS:
            said = probs[c] >= 0.5
            female, male = float(np.mean(~said[labels == 0])), float(np.mean(said[labels == 1]))
            sums[c].append([female, male, (female + male) / 2])
    lines = [f"Held-out recall per class, mean of {len(rows)} seeds (threshold 0.5):", "",
             "| column | female recall | male recall | balanced accuracy |", "|---|---|---|---|"]  # fmt: skip
    for c in COLUMNS:
        f, m, b = np.mean(sums[c], axis=0)
        lines.append(f"| {c} | {f:.3f} | {m:.3f} | {b:.3f} |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    """Markdown: per seed, held-out (and test) accuracy of each column, the best single model, the ensemble
    against its best member; then the means and the acceptance checks."""
    head = ("| seed | held-out images | " + " | ".join(COLUMNS) + " | ensemble members | best single "
            "| ensemble - best member | ensemble - best single |")  # fmt: skip
    lines = [head, "|---|---|" + "---|" * (len(COLUMNS) + 4)]
    checks = []
    for r in sorted(rows, key=lambda r: r["seed"]):
        held, test = r["heldout_accuracy"], r["test_accuracy"]
        members = r.get("ensemble_members") or []
        best_single = max(held[m] for m in MODELS)
        best_member = max((held[m] for m in members), default=float("nan"))
        figures = [f"{held[c]:.3f} ({test[c]:.3f})" if c in held else "n/a" for c in COLUMNS]
        lines.append(f"| {r['seed']} | {r['heldout_images']} | " + " | ".join(figures)
                     + f" | {', '.join(members)} | {best_single:.3f} | {held['ensemble'] - best_member:+.3f} "
                     f"| {held['ensemble'] - best_single:+.3f} |")  # fmt: skip
        checks.append((best_single >= TARGET_BEST, held["ensemble"] >= TARGET_ENSEMBLE,
                       held["ensemble"] >= best_member - 1e-9, held["ensemble"] >= best_single - 1e-9))  # fmt: skip
    if not rows:
        return "No finished runs of this plan and recipe."
    means = [statistics.mean(r["heldout_accuracy"][c] for r in rows) for c in COLUMNS]
    lines.append("| mean | | " + " | ".join(f"{m:.3f}" for m in means) + " | | | | |")
    names = (f"best single >= {TARGET_BEST}", f"ensemble >= {TARGET_ENSEMBLE}", "ensemble >= its best member",
             "ensemble >= the best single model")  # fmt: skip
    verdict = "; ".join(f"{name}: {sum(c[i] for c in checks)} of {len(checks)} seeds" for i, name in enumerate(names))
    return "\n".join(lines) + "\n\nHeld-out accuracy (the run's own test split in brackets). " + verdict


SHIPPED_RULE = "shipped (0.05-step weights: lowest log-loss, accuracy kept)"


def _rules(labels, val: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """The weights each way of choosing an ensemble gives the candidates in `val` (P(male) on the validation
    images, `labels` 1 = male), from validation alone; a candidate left out has none."""
    from itertools import combinations

    import numpy as np
    from sklearn.metrics import log_loss

    from gender_tasks.training.ensemble import select_members

    y = np.asarray(labels)
    names = list(val)
    probs = {m: np.asarray(val[m], dtype=float) for m in names}

    def mix(weights: dict[str, float]) -> np.ndarray:
        return sum(w * probs[m] for m, w in weights.items()) / sum(weights.values())

    def accuracy(weights):
        return float(((mix(weights) >= 0.5) == y).mean())

    def loss(weights):
        return float(log_loss(y, mix(weights), labels=[0, 1]))

    def equal(members):
        return {m: 1 / len(members) for m in members}

    best = max(names, key=lambda m: (accuracy({m: 1}), -loss({m: 1}), -names.index(m)))

    # The rule before the shipped one (until 2026-12-07): greedy forward selection of equal-weight members,
    # from the best model, adding the one that most improves (accuracy, -log-loss) while one does.
    def score(members: list[str]) -> tuple[float, float]:
        return accuracy(equal(members)), -loss(equal(members))

    greedy = [best]
    while rest := [m for m in names if m not in greedy]:
        add = max(rest, key=lambda m: (*score([*greedy, m]), -names.index(m)))
        if score([*greedy, add]) <= score(greedy):
            break
        greedy.append(add)
    floor = accuracy({best: 1})
    # Every subset, equal weights: the lowest log-loss among those whose accuracy is not below the best model's.
    subsets = [equal(c) for k in range(1, len(names) + 1) for c in combinations(names, k)]
    lowest = min((w for w in subsets if accuracy(w) >= floor), key=lambda w: (loss(w), len(w)))
    # The best model shrunk toward the plain mean of all: the largest share of the mean (0.05 steps) at which
    # validation accuracy is still not below the best model's.
    shrunk = {best: 1.0}
    for share in np.arange(1.0, 0.0, -0.05):
        weights = {m: share / len(names) + (1 - share) * (m == best) for m in names}
        if accuracy(weights) >= floor:
            shrunk = weights
            break
    shipped = select_members(y, probs)
    return {SHIPPED_RULE: dict(zip(shipped["members"], shipped["weights"], strict=True)),
            "greedy equal-weight members (the rule before)": equal(greedy),
            "best single on validation": {best: 1.0}, "lowest log-loss subset": lowest,
            "best shrunk toward the mean": shrunk, "all, equal weights": equal(names)}  # fmt: skip


def candidate_rules(probs: dict, flagged: list[str]) -> tuple[list[str], dict[str, dict[str, float]]]:
    """The candidates of a row's ensemble (its unflagged models; all four where every one is flagged, as the
    pipeline does) and the weights each rule of _rules gives them on `probs`'s validation P(male)."""
    candidates = [m for m in MODELS if m not in flagged] or list(MODELS)
    return candidates, _rules(probs["val"]["label"], {m: probs["val"][m] for m in candidates})


def _shown(weights: dict[str, float]) -> str:
    if len(set(round(w, 6) for w in weights.values())) == 1:
        return ", ".join(weights)
    return ", ".join(f"{m} {w:.2f}" for m, w in sorted(weights.items(), key=lambda kv: -kv[1]))


def rules_table(rows: list[dict]) -> str:
    """Held-out accuracy of the ensemble each rule chooses (on validation, flagged models left out), per seed."""
    import numpy as np

    rows = sorted((r for r in rows if "probabilities" in r), key=lambda r: r["seed"])
    if not rows:
        return "No rows with probabilities (rows written before they were recorded)."
    results: dict[str, list[tuple[float, str]]] = {}
    for r in rows:
        probs = r["probabilities"]
        candidates, rules = candidate_rules(probs, r["flagged"])
        held_y = np.asarray(probs["heldout"]["label"])
        for rule, weights in rules.items():
            results.setdefault(rule, []).append((_mixed_accuracy(held_y, probs["heldout"], weights), _shown(weights)))
        for bound, got in _bounds(held_y, {m: probs["heldout"][m] for m in candidates}).items():
            results.setdefault(bound, []).append(got)
    seeds = [r["seed"] for r in rows]
    lines = ["| rule | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |", "|---|" + "---|" * (len(seeds) + 1)]
    for rule, got in results.items():
        cells = [f"{acc:.3f} ({shown})" if shown else f"{acc:.3f}" for acc, shown in got]
        lines.append(f"| {rule} | " + " | ".join(cells) + f" | {np.mean([a for a, _ in got]):.3f} |")
    return "\n".join(lines)


def _run_share(row: dict) -> float | None:
    """The share of the shared faces a row's run drew from: 1 - fraction, times --keep where it kept the same
    share of both classes; None for a row that kept the classes apart (an imbalanced dataset, not a size)."""
    keep = row.get("keep") or {}
    shares = {keep.get(label, 1.0) for label in ("female", "male")}
    return round((1 - row["fraction"]) * shares.pop(), 4) if len(shares) == 1 else None


def _shipped_heldout(row: dict) -> float:
    """Held-out accuracy of the ensemble today's rule chooses on the row's validation probabilities (flagged
    models left out, as the pipeline does): rows recorded under an earlier rule are scored as if run today."""
    probs = row["probabilities"]
    weights = candidate_rules(probs, row["flagged"])[1][SHIPPED_RULE]
    return _mixed_accuracy(probs["heldout"]["label"], probs["heldout"], weights)


def curve_table(rows: list[dict]) -> str:
    """Markdown: held-out accuracy against the share of the shared faces a run trained on (--keep with one
    share for both classes, on rows of one plan and recipe): per share, the mean of each model, of the best
    model per seed and of today's ensemble rule (replayed on the validation probabilities); then, from each
    share to the next, the paired difference over the seeds both have, and that difference per doubling of
    the faces (log2 of the two shares' ratio). The held-out faces of a seed are the same at every share.
    Rows of a K-fold deal (--folds: other held-out faces per seed, so not paired) are measured against the
    per-seed lines read at their share: pooled_table's accuracy over every face, held out once."""
    by_share: dict[float, dict[int, dict]] = {}
    folded = [r for r in rows if r.get("folds") and "probabilities" in r and "error" not in r]
    for r in rows:
        share = _run_share(r)
        if share is not None and "probabilities" in r and "error" not in r and not r.get("folds"):
            by_share.setdefault(share, {})[r["seed"]] = r
    if not by_share:
        return pooled_table(folded) if folded else "No rows with probabilities and one share for both classes."
    columns = (*MODELS, "best single", "ensemble (today's rule)")
    # Per share and seed: each column's held-out accuracy (the ensemble's replayed once here, read below).
    figures = {share: {seed: [*(r["heldout_accuracy"][m] for m in MODELS),
                              max(r["heldout_accuracy"][m] for m in MODELS), _shipped_heldout(r)]
                       for seed, r in runs.items()} for share, runs in by_share.items()}  # fmt: skip

    shares = sorted(by_share)
    lines = ["| share of the faces | runs | training images | " + " | ".join(columns) + " |",
             "|---|---|---|" + "---|" * len(columns)]  # fmt: skip
    for share in shares:
        runs = by_share[share]
        train = statistics.mean(sum(r["counts"]["train"].values()) for r in runs.values())
        means = np.mean(list(figures[share].values()), axis=0)
        lines.append(f"| {share:.2f} | {len(runs)} | {train:.0f} | " + " | ".join(f"{v:.3f}" for v in means) + " |")
    for low, high in zip(shares, shares[1:], strict=False):
        seeds = sorted(set(by_share[low]) & set(by_share[high]))
        if not seeds:
            continue
        doublings = float(np.log2(high / low))
        lines += ["", f"From {low:.2f} to {high:.2f} of the faces ({doublings:.2f} doublings), paired over seeds "
                  f"{', '.join(map(str, seeds))}:", "", "| column | difference | t | per doubling |", "|---|---|---|---|"]  # fmt: skip
        pairs = [(figures[low][s], figures[high][s]) for s in seeds]
        for i, column in enumerate(columns):
            diff = [b[i] - a[i] for a, b in pairs]
            lines.append(f"| {column} | {statistics.mean(diff):+.3f} | {t_text(diff)} "
                         f"| {statistics.mean(diff) / doublings:+.3f} |")  # fmt: skip
    everywhere = sorted(set.intersection(*(set(by_share[share]) for share in shares)))
    if len(shares) > 1 and len(everywhere) > 1:
        # Per seed, a straight line in log2(share) through its figures at every share, read at share 1: what a
        # run on all of the faces would score if the curve went on as it did. An extrapolation, not a measurement.
        x = np.log2(shares)
        lines += ["", f"A line per seed through every share (accuracy = a + b log2(share)), seeds "
                  f"{', '.join(map(str, everywhere))}: its slope, and its value at 1.00 of the faces, "
                  "extrapolated (mean and standard error over the seeds):", "",
                  "| column | per doubling | at 1.00 of the faces |", "|---|---|---|"]  # fmt: skip
        per_seed = {seed: np.array([figures[share][seed] for share in shares]) for seed in everywhere}
        fits = {column: [np.polyfit(x, per_seed[seed][:, i], 1) for seed in everywhere]
                for i, column in enumerate(columns)}  # fmt: skip
        for column, lines_of in fits.items():
            slope, at_one = [f[0] for f in lines_of], [f[1] for f in lines_of]
            lines.append(f"| {column} | {_mean_se(slope, '+')} | {_mean_se(at_one, '')} |")
        if folded:
            k = folded[0]["folds"]
            at = 1 - 1 / k
            lines += ["", f"Measured at {at:.2f} of the faces with {k} folds (every face held out once, by a run that "
                      f"did not train on it), beside the lines above read at {at:.2f}:", "",
                      pooled_table(folded), "", f"| column | the lines read at {at:.2f} |", "|---|---|"]  # fmt: skip
            for column, lines_of in fits.items():
                read = [f[1] + f[0] * np.log2(at) for f in lines_of]
                lines.append(f"| {column} | {_mean_se(read, '')} |")
    elif folded:
        lines += ["", pooled_table(folded)]
    return "\n".join(lines)


def pooled_table(rows: list[dict]) -> str:
    """Markdown, for the rows of one K-fold deal (seeds 0..K-1, each holding out one fold, so every face is
    held out exactly once): per column, the accuracy over all the held-out faces pooled, each face scored by
    the run that did not train on it, with a 95 % Wilson interval over the faces; the ensemble is today's
    rule replayed on each run's validation P(male). Then each model against that ensemble on the same faces:
    the faces only one of the two gets right, and the exact two-sided McNemar p of that split."""
    from scipy.stats import binomtest

    from gender_tasks.evaluation.stats import mcnemar

    rows = sorted((r for r in rows if "probabilities" in r and "error" not in r), key=lambda r: r["seed"])
    folds = {r.get("folds") for r in rows}
    if not rows or None in folds or len(folds) != 1:
        return "No rows of one K-fold deal (--folds) with probabilities."
    k = folds.pop()
    missing = sorted(set(range(k)) - {r["seed"] for r in rows})
    said: dict[str, list[np.ndarray]] = {c: [] for c in (*MODELS, "ensemble")}  # male (1) or not, per face
    for r in rows:
        held = r["probabilities"]["heldout"]
        weights = candidate_rules(r["probabilities"], r["flagged"])[1][SHIPPED_RULE]
        for m in MODELS:
            said[m].append(np.asarray(held[m]) >= 0.5)
        said["ensemble"].append(_mixed(held, weights) >= 0.5)
    y = np.concatenate([np.asarray(r["probabilities"]["heldout"]["label"]) for r in rows])
    predicted = {c: np.concatenate(v).astype(int) for c, v in said.items()}
    hits = {c: p == y for c, p in predicted.items()}
    faces = len(y)
    train = statistics.mean(sum(r["counts"]["train"].values()) for r in rows)
    note = f" Folds not yet run: {', '.join(map(str, missing))}, so not every face is in." if missing else ""
    lines = [f"{len(rows)} of {k} folds, {faces} held-out faces, each run trained on {1 - 1 / k:.2f} of the faces "
             f"({train:.0f} training images on average).{note}", "",
             "| column | right | accuracy | 95 % interval (Wilson, over the faces) |", "|---|---|---|---|"]  # fmt: skip
    for c, hit in hits.items():
        low, high = binomtest(int(hit.sum()), faces).proportion_ci(method="wilson")
        lines.append(f"| {c} | {int(hit.sum())} of {faces} | {hit.mean():.3f} | {low:.3f} to {high:.3f} |")
    lines += ["", "| model | only the ensemble right | only the model right | McNemar p |", "|---|---|---|---|"]
    for m in MODELS:
        test = mcnemar(y, predicted["ensemble"], predicted[m])
        lines.append(f"| {m} | {test['only_a_right']} | {test['only_b_right']} | {test['p_value']:.3f} |")
    return "\n".join(lines)


def _mean_se(values: list[float], sign: str) -> str:
    mean = round(statistics.mean(values), 3) + 0.0  # + 0.0: a fit's -1e-17 shows as +0.000, not -0.000
    return f"{mean:{sign}.3f} ± {statistics.stdev(values) / len(values) ** 0.5:.3f}"


def _mixed(probs: dict[str, list[float]], weights: dict[str, float]) -> np.ndarray:
    """The weighted mean of the models' P(male)."""
    return sum(w * np.asarray(probs[m], dtype=float) for m, w in weights.items()) / sum(weights.values())


def _mixed_accuracy(labels, probs: dict[str, list[float]], weights: dict[str, float]) -> float:
    """Accuracy of the weighted mean of the models' P(male) against `labels` (1 = male)."""
    return float(((_mixed(probs, weights) >= 0.5) == np.asarray(labels)).mean())


BEST_SUBSET = "bound, not a rule: the best equal-weight subset, chosen on the held-out faces themselves"
ANY_RIGHT = "bound, not a rule: faces at least one candidate gets right (no weighting of them does better)"


def _bounds(labels, held: dict[str, list[float]]) -> dict[str, tuple[float, str]]:
    """What the candidates allow on the held-out faces, by reading those faces (so no rule can reach it): the
    best equal-weight subset, and the share of faces some candidate gets right (a weighted mean of P(male)
    is on the wrong side of 0.5 wherever every candidate is)."""
    from itertools import combinations

    y = np.asarray(labels)
    best, chosen = -1.0, ""
    for k in range(1, len(held) + 1):
        for members in combinations(held, k):
            accuracy = _mixed_accuracy(y, held, dict.fromkeys(members, 1.0))
            if accuracy > best:
                best, chosen = accuracy, ", ".join(members)
    right = np.zeros(len(y), dtype=bool)
    for p in held.values():
        right |= (np.asarray(p, dtype=float) >= 0.5) == y
    return {BEST_SUBSET: (best, chosen), ANY_RIGHT: (float(right.mean()), "")}


def _child(seed: int, fraction: float, epochs: dict[str, int] | None = None, recipe: dict | None = None,
           keep: dict[str, float] | None = None, folds: int | None = None) -> dict:  # fmt: skip
    cmd = [sys.executable, __file__, "--one", str(seed), "--fraction", str(fraction),
           *(["--folds", str(folds)] if folds else []),
           "--epochs", ",".join(f"{m}={n}" for m, n in (epochs or {}).items()),
           "--recipe", ",".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in (recipe or {}).items()),
           "--keep", ",".join(f"{k}={v}" for k, v in (keep or {}).items())]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        return {
            "seed": seed,
            "fraction": fraction,
            **({"epochs": epochs} if epochs else {}),
            **({"recipe_changes": recipe} if recipe else {}),
            **({"keep": keep} if keep else {}),
            **({"folds": folds} if folds else {}),
            "error": f"exit {done.returncode}: {(done.stderr or done.stdout)[-2000:]}",
        }
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--fraction", type=float, default=FRACTION, help="of each class's faces held out")
    parser.add_argument("--out", type=Path, default=Path("heldout.jsonl"))
    parser.add_argument("--table", type=Path, help="print the table of this --out file (at --fraction) and exit")
    parser.add_argument("--rules", action="store_true", help="with --table: compare ways of choosing the ensemble")
    parser.add_argument("--epochs", default="", help="MODEL=N,...: these models' cpu epochs (a recipe to measure)")
    parser.add_argument(
        "--recipe",
        default="",
        help="KEY=VALUE,...: the cpu recipe with these fields changed "
        "(a recipe to measure), e.g. class_weighting=balanced",
    )
    parser.add_argument(
        "--keep",
        default="",
        help="LABEL=SHARE,...: keep only this share of a class's faces "
        "in the run (an imbalanced dataset), e.g. male=0.33",
    )
    parser.add_argument("--per-class", action="store_true", help="with --table: recall per class, balanced accuracy")
    parser.add_argument(
        "--curve",
        type=Path,
        nargs="+",
        metavar="FILE",
        help="print held-out accuracy against the share of the faces trained on (rows of these "
        "files at every --keep with one share for both classes) and exit",
    )
    parser.add_argument(
        "--folds",
        type=int,
        help="K: deal the faces into K folds once and let seed s (0 to K-1) hold out fold s, so that seeds "
        "0..K-1 hold out every face exactly once (--fraction is then 1/K); with --table, adds the accuracy "
        "over all the faces pooled",
    )
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.folds is not None:
        if args.folds < 2:
            parser.error(f"--folds: expected 2 or more folds, got {args.folds}")
        args.fraction = round(1 / args.folds, 4)
    if not 0 < args.fraction < 1:
        parser.error(f"--fraction: expected a share between 0 and 1, got {args.fraction}")
    epochs = parse_epochs(parser, args.epochs, MODELS)
    recipe = parse_recipe(parser, args.recipe)
    keep = parse_keep(parser, args.keep)
    if args.curve:
        print(curve_table(_trained_as([row for path in args.curve for row in _rows_of(path)], DRAW, epochs, recipe)))
        return
    if args.one is not None:
        print("RESULT " + json.dumps(one_run(args.one, args.fraction, epochs, recipe, keep, args.folds)), flush=True)
        return
    if args.table:
        rows = list(_done(args.table, args.fraction, draw=None, epochs=epochs, recipe=recipe, keep=keep,
                          folds=args.folds).values())  # fmt: skip
        print(rules_table(rows) if args.rules else table(rows))
        if args.folds and rows and not args.rules:
            print("\n" + pooled_table(rows))
        if args.per_class and rows:
            print("\n" + per_class_table(rows))
        if (epochs or recipe) and not args.rules:
            print(
                "\n"
                + paired(
                    _done(args.table, args.fraction, keep=keep, folds=args.folds),
                    _done(args.table, args.fraction, epochs=epochs, recipe=recipe, keep=keep, folds=args.folds),
                )
            )
        return
    done = _done(args.out, args.fraction, epochs=epochs, recipe=recipe, keep=keep, folds=args.folds)
    todo = [int(s) for s in args.seeds.split(",") if int(s) not in done]
    if args.folds and any(not 0 <= s < args.folds for s in todo):
        parser.error(f"--seeds: with --folds {args.folds} each seed names a fold, 0 to {args.folds - 1}")
    print(f"{len(done)} seeds on record, {len(todo)} to go (one at a time: each trains on every core)", flush=True)
    for seed in todo:
        result = _child(seed, args.fraction, epochs, recipe, keep, args.folds)
        with args.out.open("a") as f:
            f.write(json.dumps(result) + "\n")
        shown = result.get("error") or {k: round(v, 3) for k, v in result["heldout_accuracy"].items()}
        print(seed, shown, result.get("seconds"), flush=True)
    rows = list(_done(args.out, args.fraction, epochs=epochs, recipe=recipe, keep=keep, folds=args.folds).values())
    if rows:
        print(table(rows))


if __name__ == "__main__":
    main()
