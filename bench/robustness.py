"""Robustness: do the four models (and their ensemble) hold up on small and odd datasets?

    .venv/bin/python bench/robustness.py --sizes 100,300,1000 --kinds sample,variants --seeds 0,1,2,3,4 \
        --jobs 2 --out bench/robustness.jsonl
    .venv/bin/python bench/robustness.py --table bench/robustness.jsonl     # the markdown table only

Each *run* is one (size, kind, seed): a dataset of `size` faces a class, built in a temp folder outside
the repo from ../shared/data/generated_photos, then the pipeline as a user runs it, in its own process
(prepare, ingest, split, validate, preprocess, train the four models at the `cpu` profile, ensemble,
report), on local storage in that folder, with `seed` as the run's seed (split and training):

  sample    `size` distinct faces a class, drawn at random (seeded) from the shared faces; not possible
            where the class has fewer faces than that (the shared set has 577 female, 417 male).
  variants  `size` generated variants a class (random crop, rotation, flip, colour change; 96 px JPEGs)
            of faces drawn at random from the shared faces, as many distinct faces as the class has
            up to `size`: at 100 and 300 a class every variant has its own face; at 1,000 faces repeat
            (two or three variants each), and the split keeps only near-identical ones together.

`--epochs cnn=96,mobilenetv2=40` (an example: twice the plan in force, 48 and 20) trains those models with these
epochs in their `cpu` plans (min_steps unchanged), to measure a plan before adopting it. A row counts wherever
its models trained the epochs the plan in force gives its dataset (planned_epochs): rows recorded under one plan
stand for another in the cells where the minimum decides alike (at 100 and 150 a class, for this change), and a
change of plan reruns only the others.

`--min-steps-scale F` trains with F times each model's `min_steps` (models/registry.py; 0: the epochs as
given, whatever the dataset's size), to measure what the minimum does; rows record it, and the table
shows the runs of one scale (the same option, default 1; rows without a scale predate the minimum: 0).
`--min-steps inceptionv3=220` sets one model's minimum outright (after the scale), `--image-size
inceptionv3=96` its input size at the `cpu` profile, and `--models
inceptionv3` trains only those models (no ensemble: it needs two), to measure one model's recipe
without paying for the other three: a model's training depends only on the dataset, split and seed,
not on the other models, so its figures sit beside the full runs' others. Rows record both; the table
shows the rows of the options given, and `--table-over FULL` puts a subset's columns over FULL's rows
of the same size, kind and seed (the ensemble column then stays FULL's, and says so).

`--score-rest` (sample runs only) also scores every model and the ensemble on the shared faces the run did
not draw, less every near-duplicate group (heldout.py's grouping: phash within 4 bits, chained, across the
classes) with a member in the run's sample: several hundred faces the run never saw, against the test
split's 30 at 100 a class, to tell a model's accuracy from the luck of its test draw. Scoring comes after
training, so the run's figures are those of the same run without it; rows record `rest_images` and
`rest_accuracy`, and the table of such rows adds one of test against rest accuracy per run. With all four models
they also record every model's P(male) on its validation and test images and on the rest (`probabilities`, as
bench/heldout.py's rows: "heldout" is the rest), and the tables add, per cell, ways of choosing the ensemble
replayed on them and scored on the rest (`heldout.rules_table`); every row records the ensemble's weights
(`ensemble_weights`).

Each run appends one JSON line to --out (test accuracy per model and the ensemble, the models the
report flagged, seconds); a rerun with the same --out skips the runs already there. The table gives,
per size and kind, the min and median test accuracy of each model over the seeds, and checks the
target: no model below 0.65 in any run where the CNN reaches 0.80.
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
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_bench import (  # noqa: E402 - the bench folder's own helpers
    SOURCE,
    _sources,
    _variant,
    machine,
    parse_epochs,
    per_model_option,
    replace_cpu_plan,
    set_cpu_epochs,
)

MODELS = ("cnn", "resnet50", "inceptionv3", "mobilenetv2")
COLUMNS = (*MODELS, "ensemble")
TARGET_CNN, TARGET_FLOOR = 0.80, 0.65


def build_dataset(size: int, kind: str, seed: int, folder: Path, source: Path = SOURCE) -> int:
    """`size` faces a class of `kind` in folder/<label>/; returns how many distinct source faces it used."""
    rng = random.Random(f"robustness-{kind}-{size}-{seed}")
    by_class = {label: [p for p, lab in _sources(source) if lab == label] for label in ("female", "male")}
    distinct = 0
    for label, faces in by_class.items():
        (folder / label).mkdir(parents=True, exist_ok=True)
        if kind == "sample":
            if len(faces) < size:
                raise ValueError(f"{source.name} has {len(faces)} {label} faces, fewer than {size}")
            for path in rng.sample(faces, size):
                shutil.copyfile(path, folder / label / path.name)
            distinct += size
        elif kind == "variants":
            chosen = rng.sample(faces, min(size, len(faces)))
            distinct += len(chosen)
            base = rng.randrange(10**9)  # variant i's crop/rotation/colour is seeded by base + i
            for i in range(size):
                _variant((base + i, chosen[i % len(chosen)], label, folder, 96))
        else:
            raise ValueError(f"unknown kind {kind!r}: expected sample or variants")
    return distinct


REST_SET = "rest"


def rest_faces(folder: Path, rest: Path, source: Path = SOURCE) -> int:
    """Copy into rest/<label>/ the faces of `source` that are not in `folder` (a sample build_dataset drew from
    it: same file names) and share no near-duplicate group with a face that is; returns how many."""
    from heldout import near_duplicate_groups  # the bench folder's grouping, the split's own

    faces = _sources(source)
    drawn = {(label, p.name) for label in ("female", "male") for p in (folder / label).iterdir()}
    groups = near_duplicate_groups([p for p, _ in faces])
    seen = {g for (p, label), g in zip(faces, groups, strict=True) if (label, p.name) in drawn}
    copied = 0
    for (path, label), group in zip(faces, groups, strict=True):
        if group not in seen:
            (rest / label).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, rest / label / path.name)
            copied += 1
    return copied


def _scale_min_steps(scale: float, overrides: dict[str, int] | None = None,
                     image_size: dict[str, int] | None = None) -> None:  # fmt: skip
    """Every registered model's cpu plan with `scale` times its min_steps, or the override named for it,
    and the input size named for it (in this process only)."""
    from gender_tasks.models.registry import get_model_spec, model_names

    overrides, image_size = overrides or {}, image_size or {}
    unknown = (set(overrides) | set(image_size)) - set(model_names())
    if unknown:
        raise ValueError(
            f"--min-steps/--image-size name unknown models {sorted(unknown)}; expected some of {model_names()}"
        )
    for name in model_names():
        cpu = get_model_spec(name).profiles["cpu"]
        replace_cpu_plan(name, min_steps=overrides.get(name, round(cpu.min_steps * scale)),
                         image_size=image_size.get(name, cpu.image_size))  # fmt: skip


def one_run(size: int, kind: str, seed: int, jobs: int, scale: float = 1.0, models: tuple[str, ...] = MODELS,
            min_steps: dict[str, int] | None = None, image_size: dict[str, int] | None = None,
            score_rest: bool = False) -> dict:  # fmt: skip
    """In a child process: build the dataset, run the pipeline on it, return its figures."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    from gender_tasks import pipeline
    from gender_tasks.data.shards import CACHE_DIR_ENV
    from gender_tasks.layout import external_key, model_file_key
    from gender_tasks.models.registry import get_model_spec

    _scale_min_steps(scale, min_steps, image_size)

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="robustness-"))
    try:
        folder = work / "faces"
        distinct = build_dataset(size, kind, seed, folder)
        score_rest = score_rest and kind == "sample"
        rest_images = rest_faces(folder, work / REST_SET) if score_rest else 0
        os.environ[CACHE_DIR_ENV] = str(work / "local-cache")
        conf = {"source": str(folder), "storage": str(work / "store"), "profile": "cpu", "seed": seed,
                "label_audit": False, "models": list(models),
                **({"external_eval": [str(work / REST_SET)]} if score_rest else {})}  # fmt: skip
        run = pipeline.prepare(conf, run_id=f"robustness-{size}-{kind}-{seed}")
        for step in (pipeline.ingest, pipeline.split, pipeline.validate, pipeline.preprocess):
            run = step(run)
        trained = [pipeline.train(run, name, parallel_tasks=jobs) for name in models]
        ensembled = pipeline.ensemble(run)
        out = pipeline.report(run, trained, ensembled=None if "skipped" in ensembled else ensembled)
        rest = {}
        if score_rest:  # after training and the report: the run's own figures are those of a run without it
            pipeline.evaluate_external(run)
            scored = json.loads((work / "store" / external_key(run["run_key"], REST_SET)).read_text())
            if scored["images"] != rest_images:
                raise RuntimeError(f"scored {scored['images']} of the {rest_images} faces set aside")
            rest = {"rest_images": rest_images,
                    "rest_accuracy": {m: r["accuracy"] for m, r in scored["models"].items()}}  # fmt: skip
            if set(models) == set(MODELS):  # every model's P(male): ways of choosing the ensemble can be replayed
                from heldout import _probabilities  # the bench folder's reading, as heldout.py's rows record it

                rest["probabilities"] = _probabilities(run["run_key"], work / "store", work / REST_SET)
        results = json.loads(Path(out["results_uri"].removeprefix("file://")).read_text())
        trained_as = {m: json.loads((work / "store" / model_file_key(run["run_key"], m, "metrics.json")).read_text())
                      for m in models}  # fmt: skip
        epochs = {m: t["epochs"] for m, t in trained_as.items()}
        return {
            "size": size, "kind": kind, "seed": seed, "min_steps_scale": scale,
            **_options(models, min_steps, image_size), "epochs": epochs,
            "image_sizes": {m: t["image_size"] for m, t in trained_as.items()},
            "plan_epochs": {m: get_model_spec(m).profiles["cpu"].epochs for m in models},
            "class_weighting": cpu_class_weighting(),
            "distinct_faces": distinct,
            "counts": run["split"]["counts"], "test_accuracy": out["test_accuracy"],
            "flagged": sorted(results.get("flagged") or {}),
            "ensemble_members": _members(results.get("ensemble")),
            "ensemble_weights": _members(results.get("ensemble"), "weights"), **rest,
            "machine": machine(),
            "seconds": round(time.perf_counter() - started, 1),
        }  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _members(ensemble, field: str = "members") -> list | None:
    """The ensemble's members, or with `field` their weights (results.json "ensemble": one entry per repeat;
    repeat 0's), None without one."""
    first = ensemble[0] if isinstance(ensemble, list) and ensemble else ensemble
    return first.get(field) if isinstance(first, dict) else None


OPTION_KEYS = ("models", "min_steps", "image_size")


def _options(models: tuple[str, ...], min_steps: dict[str, int] | None,
             image_size: dict[str, int] | None = None) -> dict:  # fmt: skip
    """What a row records of --models, --min-steps and --image-size: nothing where they are the defaults (the
    rows written before these options existed are full runs without overrides)."""
    return {**({"models": list(models)} if tuple(models) != MODELS else {}),
            **({"min_steps": dict(sorted(min_steps.items()))} if min_steps else {}),
            **({"image_size": dict(sorted(image_size.items()))} if image_size else {})}  # fmt: skip


def _child(size: int, kind: str, seed: int, jobs: int, scale: float, models: tuple[str, ...],
           min_steps: dict[str, int], image_size: dict[str, int], score_rest: bool = False,
           epochs: dict[str, int] | None = None) -> dict:  # fmt: skip
    cmd = [sys.executable, __file__, "--one", f"{size},{kind},{seed}", "--jobs", str(jobs),
           "--epochs", ",".join(f"{m}={n}" for m, n in (epochs or {}).items()),
           *(["--score-rest"] if score_rest else []),
           "--min-steps-scale", str(scale), "--models", ",".join(models),
           "--min-steps", ",".join(f"{m}={n}" for m, n in min_steps.items()),
           "--image-size", ",".join(f"{m}={n}" for m, n in image_size.items())]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        tail = (done.stderr or done.stdout)[-2000:]
        return {"size": size, "kind": kind, "seed": seed, "min_steps_scale": scale,
                **_options(models, min_steps, image_size), "error": f"exit {done.returncode}: {tail}"}  # fmt: skip
    return json.loads(lines[-1].removeprefix("RESULT "))


def planned_epochs(train_images: int, scale: float = 1.0, min_steps: dict[str, int] | None = None) -> dict[str, int]:
    """The epochs each model trains at the `cpu` profile as registered now (its epochs, raised to
    `scale` times its min_steps or the --min-steps given) on a training split of `train_images` images."""
    from dataclasses import replace

    from gender_tasks.models.registry import get_model_spec
    from gender_tasks.settings.profiles import PROFILES
    from gender_tasks.training.recipe import steps_per_epoch

    per_epoch = steps_per_epoch(train_images, PROFILES["cpu"].batch_size)
    planned = {}
    for name in MODELS:
        plan = get_model_spec(name).profiles["cpu"]
        floor = (min_steps or {}).get(name, round(plan.min_steps * scale))
        planned[name] = replace(plan, min_steps=floor).scaled_to(per_epoch).epochs
    return planned


def _as_planned(row: dict, scale: float, min_steps: dict[str, int] | None) -> bool:
    """Whether the row's models trained the epochs today's plans give its dataset: rows of an earlier plan
    (the CNN at 12 epochs and MobileNetV2 at 5 before 24 and 10) count only where the minimum decided alike.
    Rows that do not record their epochs are taken as they are."""
    if "epochs" not in row:
        return True
    planned = planned_epochs(sum(row["counts"]["train"].values()), scale, min_steps)
    return all(planned[m] == n for m, n in row["epochs"].items())


def cpu_class_weighting() -> str:
    """The `cpu` recipe's class weighting as registered now."""
    from heldout import cpu_recipe  # the bench folder's reading of the registered recipe

    return cpu_recipe()["class_weighting"]


def _weighted_alike(row: dict) -> bool:
    """Whether the row trained as today's class weighting would: rows that do not record theirs trained
    unweighted ("none"), which is the same training under "balanced" where the training split's classes are
    equal (every weight exactly 1)."""
    if row.get("class_weighting", "none") == cpu_class_weighting():
        return True
    train = row.get("counts", {}).get("train", {})
    return bool(train) and train.get("female") == train.get("male")


def _done(out: Path, scale: float, models: tuple[str, ...] = MODELS, min_steps: dict[str, int] | None = None,
          image_size: dict[str, int] | None = None, rest: bool = False) -> dict[tuple, dict]:  # fmt: skip
    """The finished runs of --out with these options (rows without a scale predate the minimum: 0) that
    trained as today's plans and class weighting would; with `rest`, only the sample runs that scored the rest of the faces
    (--score-rest)."""
    if not out.exists():
        return {}
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    wanted = _options(models, min_steps, image_size)
    return {(r["size"], r["kind"], r["seed"]): r for r in rows
            if "error" not in r and float(r.get("min_steps_scale", 0.0)) == scale
            and {k: r[k] for k in OPTION_KEYS if k in r} == wanted
            and (not rest or "rest_accuracy" in r) and _as_planned(r, scale, min_steps)
            and _weighted_alike(r)}  # fmt: skip


def overlay(full: dict[tuple, dict], part: dict[tuple, dict]) -> list[dict]:
    """`full`'s rows with the columns `part` trained taken from `part`'s row of the same run, for the runs
    both have; the ensemble stays full's (it was chosen among full's models)."""
    rows = []
    for key, row in full.items():
        if key in part:
            over = part[key]
            rows.append({**row, "test_accuracy": {**row["test_accuracy"], **over["test_accuracy"]},
                         "flagged": sorted({*(f for f in row["flagged"] if f not in over.get("models", MODELS)), *over["flagged"]})})  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: per size and kind, min / median test accuracy of each column over the seeds, then the target."""
    lines = ["| faces a class | kind | runs | " + " | ".join(f"{c} min / median" for c in COLUMNS) + " | flagged |",
             "|---|---|---|" + "---|" * (len(COLUMNS) + 1)]  # fmt: skip
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["size"], r["kind"]), []).append(r)
    misses = []
    for (size, kind), runs in sorted(cells.items()):
        figures = []
        for column in COLUMNS:
            values = [r["test_accuracy"].get(column) for r in runs if r["test_accuracy"].get(column) is not None]
            figures.append(f"{min(values):.3f} / {statistics.median(values):.3f}" if values else "n/a")
        flagged = sum(len(r["flagged"]) for r in runs)
        lines.append(f"| {size:,} | {kind} | {len(runs)} | " + " | ".join(figures) + f" | {flagged} |")
        for r in runs:
            accuracy = r["test_accuracy"]
            if accuracy.get("cnn", 0) >= TARGET_CNN:
                misses += [f"{size} {kind} seed {r['seed']}: {m} {accuracy[m]:.3f}"
                           for m in MODELS if accuracy.get(m) is not None and accuracy[m] < TARGET_FLOOR]  # fmt: skip
    counted = sum(1 for r in rows if r["test_accuracy"].get("cnn", 0) >= TARGET_CNN)
    if not any("cnn" in r["test_accuracy"] for r in rows):
        return "\n".join(lines) + "\n\nTarget not checked: these runs did not train the CNN (see --table-over)"
    verdict = (f"Target (no model below {TARGET_FLOOR} in a run where the CNN reaches {TARGET_CNN}): "
               + ("met" if not misses else "MISSED: " + "; ".join(misses))
               + f" ({counted} of {len(rows)} runs have the CNN at {TARGET_CNN} or more)")  # fmt: skip
    return "\n".join(lines) + "\n\n" + verdict


def rest_table(rows: list[dict]) -> str:
    """Markdown: per run that scored the rest of the faces, each column's test / rest accuracy, then per
    column the mean of each and the lowest rest accuracy; "" without such rows."""
    rows = sorted((r for r in rows if "rest_accuracy" in r), key=lambda r: (r["size"], r["kind"], r["seed"]))
    if not rows:
        return ""
    columns = [c for c in COLUMNS if any(c in r["rest_accuracy"] for r in rows)]
    lines = ["| faces a class | seed | test images | rest images | " + " | ".join(f"{c} test / rest" for c in columns) + " |",
             "|---|---|---|---|" + "---|" * len(columns)]  # fmt: skip
    for r in rows:
        cells = [f"{r['test_accuracy'][c]:.3f} / {r['rest_accuracy'][c]:.3f}" if c in r["rest_accuracy"] else "n/a"
                 for c in columns]  # fmt: skip
        lines.append(
            f"| {r['size']:,} | {r['seed']} | {sum(r['counts']['test'].values())} | {r['rest_images']} | "
            + " | ".join(cells)
            + " |"
        )
    means = []
    for c in columns:
        pairs = [(r["test_accuracy"][c], r["rest_accuracy"][c]) for r in rows if c in r["rest_accuracy"]]
        means.append(f"{statistics.mean(t for t, _ in pairs):.3f} / {statistics.mean(v for _, v in pairs):.3f} "
                     f"(rest min {min(v for _, v in pairs):.3f})")  # fmt: skip
    lines.append("| mean | | | | " + " | ".join(means) + " |")
    counted = [r for r in rows if r["rest_accuracy"].get("cnn", 0) >= TARGET_CNN]
    misses = [f"seed {r['seed']}: {m} {r['rest_accuracy'][m]:.3f}" for r in counted for m in MODELS
              if r["rest_accuracy"].get(m) is not None and r["rest_accuracy"][m] < TARGET_FLOOR]  # fmt: skip
    lowest = min((r["rest_accuracy"][m] for r in counted for m in MODELS if m in r["rest_accuracy"]), default=None)
    verdict = (f"The target on the rest (no model below {TARGET_FLOOR} where the CNN reaches {TARGET_CNN} on it): "
               + ("met" if not misses else "MISSED: " + "; ".join(misses))
               + f" ({len(counted)} of {len(rows)} runs count"
               + (f"; their lowest model: {lowest:.3f})" if lowest is not None else ")"))  # fmt: skip
    return "\n".join(lines) + "\n\n" + verdict


def _print_tables(rows: list[dict]) -> None:
    """The table, the test-against-rest table where the rows scored the rest, and where they recorded
    probabilities, the ways of choosing the ensemble replayed on the rest (heldout.rules_table), per cell."""
    print(table(rows))
    shown = rest_table(rows)
    if shown:
        print("\nTest split against the rest of the shared faces (--score-rest):\n\n" + shown)
    from heldout import rules_table  # the bench folder's replay of the rules, as for heldout.py's rows

    for size, kind in sorted({(r["size"], r["kind"]) for r in rows if "probabilities" in r}):
        cell = [r for r in rows if (r["size"], r["kind"]) == (size, kind) and "probabilities" in r]
        print(f"\nWays of choosing the ensemble, scored on the rest: {size:,} {kind}, {len(cell)} runs\n\n"
              + rules_table(cell))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,300,1000")
    parser.add_argument("--kinds", default="sample,variants")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (each trains with cores/jobs threads)")
    parser.add_argument("--out", type=Path, default=Path("robustness.jsonl"))
    parser.add_argument(
        "--min-steps-scale",
        type=float,
        default=1.0,
        help="train with this times each model's min_steps (0: the epochs as given)",
    )
    parser.add_argument("--min-steps", default="", help="MODEL=N,...: these models' minimum steps outright")
    parser.add_argument("--image-size", default="", help="MODEL=PX,...: these models' cpu input size")
    parser.add_argument("--models", default=",".join(MODELS), help="train only these (no ensemble below two)")
    parser.add_argument("--epochs", default="",
                        help="MODEL=N,...: these models' cpu epochs (min_steps unchanged), to measure a plan; its rows "
                             "count wherever they trained as the plan in force would")  # fmt: skip
    parser.add_argument("--table", type=Path, help="print the table of this --out file (at the options given) and exit")
    parser.add_argument(
        "--table-over", type=Path, help="with --table: its rows' columns over this file's full runs (default options)"
    )
    parser.add_argument(
        "--score-rest",
        action="store_true",
        help="sample runs: also score the faces they did not draw (near-duplicates left out)",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    models = tuple(m for m in args.models.split(",") if m)
    unknown = set(models) - set(MODELS)
    if unknown or not models:
        parser.error(f"--models: expected some of {','.join(MODELS)}, got {args.models!r}")
    min_steps, image_size = (
        per_model_option(parser, "--min-steps", args.min_steps),
        per_model_option(parser, "--image-size", args.image_size),
    )
    epochs = parse_epochs(parser, args.epochs, MODELS)
    set_cpu_epochs(epochs)  # here too: which recorded rows count (planned_epochs) follows the plan
    if args.one:
        size, kind, seed = args.one.split(",")
        result = one_run(
            int(size), kind, int(seed), args.jobs, args.min_steps_scale, models, min_steps, image_size, args.score_rest
        )
        print("RESULT " + json.dumps(result), flush=True)
        return
    if args.table:
        done = _done(args.table, args.min_steps_scale, models, min_steps, image_size, args.score_rest)
        rows = list(done.values())
        if args.table_over:
            rows = overlay(_done(args.table_over, 1.0), done)
            print(
                f"Columns {', '.join(models)} from {args.table.name} ({_options(models, min_steps, image_size)}); the rest, "
                f"the ensemble included, from {args.table_over.name}'s full runs of the same dataset and seed.\n"
            )
        _print_tables(rows)
        return
    done = _done(args.out, args.min_steps_scale, models, min_steps, image_size, args.score_rest)
    per_class = {label: sum(1 for _, lab in _sources(SOURCE) if lab == label) for label in ("female", "male")}
    todo = [(int(size), kind, int(seed)) for size in args.sizes.split(",") for kind in args.kinds.split(",")
            for seed in args.seeds.split(",")
            if (int(size), kind, int(seed)) not in done and not (kind == "sample" and int(size) > min(per_class.values()))]  # fmt: skip
    print(f"{len(done)} runs on record, {len(todo)} to go ({args.jobs} at once)", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [
            pool.submit(
                _child, *t, args.jobs, args.min_steps_scale, models, min_steps, image_size, args.score_rest, epochs
            )
            for t in todo
        ]
        for future in as_completed(futures):
            result = future.result()
            with args.out.open("a") as f:
                f.write(json.dumps(result) + "\n")
            shown = result.get("error") or {k: round(v, 3) for k, v in result["test_accuracy"].items()}
            print(result["size"], result["kind"], result["seed"], shown, result.get("seconds"), flush=True)
    rows = list(_done(args.out, args.min_steps_scale, models, min_steps, image_size, args.score_rest).values())
    _print_tables(rows)


if __name__ == "__main__":
    main()
