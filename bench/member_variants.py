"""One ensemble member changed, scored on faces the runs never saw, against bench/heldout.py's stored rows.

    GENDER_TORCH_THREADS=1 .venv/bin/python bench/member_variants.py --model cnn --variant erase \\
        --seeds 0,1,2,3,4,5,6,7,8,9 --out bench/member-variants.jsonl
    .venv/bin/python bench/member_variants.py --table bench/member-variants.jsonl    # the tables only

Issue 19's ensemble figure on unseen faces (0.91) is bounded by its members (bench/RESULTS.md, "What the four
members allow"), so a change to one member is worth measuring where it counts: beside the other three, on the
held-out faces. A full bench/heldout.py row trains all four models (six to eight minutes a seed); this trains
only --model, on the same draw (`heldout.set_aside`, the same seed, split and held-out faces), and sets its
probabilities into the stored heldout row of that seed (--against, the plan in force), so the ensemble is
chosen again, on validation only, by the shipped rule and the others of `heldout --rules`.

Variants (applied by this script, in the training child only; the product's code is unchanged):

- `base`: the member as registered. The control: on the kind of machine and thread count that wrote the
  stored rows it must give their figures to the face (the table says in how many seeds it does). On another
  kind of CPU it moves by a face or two; the table then also pairs each variant with the `base` run of the
  same seed on the same kind of machine, which leaves that noise out.
- `erase`: random erasing after the recipe's flips (per image: probability 0.5, a rectangle of 2-25 % of the
  image, aspect 0.3-3.3, set to 0 after normalisation, i.e. the channel means), as torchvision's
  `RandomErasing` does for one image, drawn per image from a generator seeded by the run's seed.
- `recipe`: the member with `--recipe KEY=VALUE,...` (fields of `gender_tasks.settings.Recipe`) over the `cpu`
  recipe, as `bench/heldout.py --recipe` does; the row's variant names the changes (`recipe label_smoothing=0.2`).
- `size`: the member at `--image-size PX` instead of its registered `cpu` input size (its epochs and
  `min_steps` as registered); the row's variant names the size (`size 96`).
- `epochs`: the member trained `--epochs N` epochs instead of its registered `cpu` epochs (its input size
  and `min_steps` as registered); the row's variant names them (`epochs 96`).
- `rate`: the member at peak learning rate `--learning-rate X` instead of the `cpu` profile's (the schedule's
  shape as shipped); the row's variant names it (`rate 0.001`).
- `batch`: the member trained in batches of `--batch-size N` instead of the `cpu` profile's 32 (the same
  epochs, so more or fewer optimizer steps; the peak rate as shipped); the row's variant names it (`batch 16`).
- `views`: the member as registered, its held-out faces also predicted under extra test-time views (each
  view through the exported module, so each is also mirrored): shifts of 2 px (reflection padding), a centre
  crop of the image decoded 8 px larger, a zoom-out of 3 px reflection padding. The table scores view sets.

Rows (one JSON line a run, appended to --out; a rerun skips the (seed, model, variant) runs already there)
hold the member's validation, test and held-out P(male), seconds, the machine and the thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heldout import (  # noqa: E402 - the bench folder's own helpers
    DRAW,
    FRACTION,
    MODELS,
    SHIPPED_RULE,
    _done,
    _mixed_accuracy,
    candidate_rules,
    parse_recipe,
    set_cpu_profile,
    set_cpu_recipe,
    split_probabilities,
    t_text,
    train_alone,
)
from scale_bench import machine, replace_cpu_plan  # noqa: E402

VARIANTS = ("base", "erase", "recipe", "size", "epochs", "rate", "batch", "views")
ALL_FOUR = "all, equal weights"  # the rule of heldout.candidate_rules that averages every unflagged model alike
ERASE_P, ERASE_AREA, ERASE_ASPECT = 0.5, (0.02, 0.25), 0.3
VIEW_SETS = {  # name: the views averaged (each view's P(male) is already the mean with its mirror image)
    "as shipped (image + mirror)": ("id",),
    "+ four 2 px shifts": ("id", "up", "down", "left", "right"),
    "+ centre crop": ("id", "crop"),
    "+ zoom-out": ("id", "zoomout"),
    "+ centre crop + zoom-out": ("id", "crop", "zoomout"),
    "all seven": ("id", "up", "down", "left", "right", "crop", "zoomout"),
}


def erase(x, gen):
    """Random erasing of a normalised NCHW batch, each image its own draw (see the module docstring)."""
    import torch

    n, _, h, w = x.shape
    on = torch.rand(n, generator=gen) < ERASE_P
    area = (ERASE_AREA[0] + torch.rand(n, generator=gen) * (ERASE_AREA[1] - ERASE_AREA[0])) * h * w
    log_low = float(np.log(ERASE_ASPECT))
    aspect = torch.exp(log_low + torch.rand(n, generator=gen) * (-2 * log_low))
    eh = torch.sqrt(area * aspect).clamp(1, h).floor()
    ew = torch.sqrt(area / aspect).clamp(1, w).floor()
    top = (torch.rand(n, generator=gen) * (h - eh + 1)).floor()
    left = (torch.rand(n, generator=gen) * (w - ew + 1)).floor()
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    inside = ((rows >= top.view(n, 1, 1)) & (rows < (top + eh).view(n, 1, 1))
              & (cols >= left.view(n, 1, 1)) & (cols < (left + ew).view(n, 1, 1)) & on.view(n, 1, 1))  # fmt: skip
    return torch.where(inside.unsqueeze(1).to(x.device), torch.zeros((), dtype=x.dtype, device=x.device), x)


def _patch_erasing(seed: int) -> None:
    """Training batches (the only calls of `Inputs` with augmentation parameters) get random erasing."""
    import torch

    from gender_tasks.training import batches

    shipped = batches.Inputs.__call__
    gen = torch.Generator().manual_seed(1000 + seed)

    def call(self, xb, aug=None):
        x = shipped(self, xb, aug)
        return x if aug is None else erase(x, gen)

    batches.Inputs.__call__ = call


def _views(module, paths: list[Path], size: int) -> dict[str, list[float]]:
    """P(male) of every held-out face under each test-time view (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    from gender_tasks.evaluation.external import _load

    decoded = [_load(p, [size, size + 8], 10**9) for p in paths]
    x, larger = (
        torch.from_numpy(np.stack([d[i] for d in decoded])).permute(0, 3, 1, 2).float() / 255.0 for i in (0, 1)
    )

    def shift(dy: int, dx: int, k: int = 2):
        padded = F.pad(x, (k, k, k, k), mode="reflect")
        return padded[:, :, k + dy : k + dy + size, k + dx : k + dx + size]

    inputs = {"id": x, "up": shift(-2, 0), "down": shift(2, 0), "left": shift(0, -2), "right": shift(0, 2),
              "crop": larger[:, :, 4 : 4 + size, 4 : 4 + size],
              "zoomout": F.interpolate(F.pad(x, (3, 3, 3, 3), mode="reflect"), size=(size, size), mode="bilinear",
                                       antialias=True, align_corners=False)}  # fmt: skip
    with torch.inference_mode():
        return {name: [round(float(p), 4) for p in np.asarray(module(v)).reshape(-1)] for name, v in inputs.items()}


def variant_name(variant: str, recipe: dict, image_size: int | None = None, epochs: int | None = None,
                 profile: dict | None = None) -> str:  # fmt: skip
    """What a row's `variant` says: the variant, for `recipe` the changes (sorted, KEY=VALUE), for `size` the
    input size, for `epochs` the epochs, for `rate` and `batch` the peak rate and the batch size."""
    if variant == "size":
        return f"size {image_size}"
    if variant == "epochs":
        return f"epochs {epochs}"
    if variant == "rate":
        return f"rate {(profile or {})['learning_rate']:g}"
    if variant == "batch":
        return f"batch {(profile or {})['batch_size']}"
    if variant != "recipe":
        return variant
    return "recipe " + ",".join(
        f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in sorted(recipe.items())
    )


def one_run(seed: int, model: str, variant: str, recipe: dict | None = None, image_size: int | None = None,
            epochs: int | None = None, profile: dict | None = None) -> dict:  # fmt: skip
    """In a child process: set the faces aside, train `model` (with `variant`) on the rest, score them."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    from gender_tasks import layout

    if variant == "size":
        replace_cpu_plan(model, image_size=image_size)
    if variant == "epochs":
        replace_cpu_plan(model, epochs=epochs)
    if variant == "erase":
        _patch_erasing(seed)
    if variant == "recipe":
        set_cpu_recipe(recipe or {})
    if variant in ("rate", "batch"):
        set_cpu_profile(profile or {})
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="member-variants-"))
    try:
        done = train_alone(seed, model, work, f"member-variants-{seed}")
        run, store, held, prob = done["run"], done["store"], done["held"], done["prob"]
        labels = [int(v == "male") for v in held["label"]]
        probabilities = {"heldout": {"label": labels, model: [round(float(p), 4) for p in prob]},
                         **split_probabilities(store, run["run_key"], model)}  # fmt: skip
        metrics = json.loads((store / layout.model_file_key(run["run_key"], model, "metrics.json")).read_text())
        return {
            "seed": seed, "fraction": FRACTION, "draw": DRAW, "model": model,
            "variant": variant_name(variant, recipe or {}, image_size, epochs, profile),
            "heldout_accuracy": float(np.mean([int(p >= 0.5) == y for p, y in zip(prob, labels, strict=True)])),
            "test_accuracy": done["trained"]["test_accuracy"], "seconds": round(time.perf_counter() - started, 1),
            "machine": machine(), "torch_threads": metrics["torch_threads"], "epochs": metrics["epochs"],
            "probabilities": probabilities,
            **({"views": _views(done["module"], list(held["path"]), done["meta"]["input_sizes"][0])}
               if variant == "views" else {}),
        }  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _rows(out: Path) -> list[dict]:
    if not out.exists():
        return []
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    return [r for r in rows if "error" not in r]


def _swapped(stored: dict, row: dict) -> dict:
    """The stored heldout row's probabilities with `row`'s member in place of its own."""
    model = row["model"]
    probs = json.loads(json.dumps(stored["probabilities"]))
    for split in ("heldout", "val", "test"):
        if probs[split]["label"] != row["probabilities"][split]["label"]:
            raise SystemExit(f"seed {row['seed']}: the {split} labels differ from the stored row's (another draw?)")
        probs[split][model] = row["probabilities"][split][model]
    return probs


def table(rows: list[dict], stored: dict[int, dict]) -> str:
    """Markdown: per (model, variant), the member and the ensemble (chosen again on validation by each rule) on
    the held-out faces, paired seed by seed with the stored rows; then, for `views` rows, the view sets."""
    lines = ["| model | variant | seeds | member held-out | vs stored, paired | t | better / worse | equal to stored "
             "| ensemble, shipped rule | vs stored | all four, equal weights | vs stored |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    view_lines: list[str] = []
    by: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["seed"] in stored:
            by.setdefault((r["model"], r["variant"]), []).append(r)
    rules = (SHIPPED_RULE, ALL_FOUR)
    # Each ensemble chosen once: every row's (its member set into its seed's stored row) and every seed's stored one.
    ensembles = {id(r): _ensembles(_swapped(stored[r["seed"]], r), stored[r["seed"]]["flagged"], rules)
                 for runs in by.values() for r in runs}  # fmt: skip
    as_stored = {s: _ensembles(stored[s]["probabilities"], stored[s]["flagged"], rules)
                 for s in {r["seed"] for runs in by.values() for r in runs}}  # fmt: skip
    for (model, variant), runs in sorted(by.items()):
        runs.sort(key=lambda r: r["seed"])
        member = [r["heldout_accuracy"] for r in runs]
        diff = [r["heldout_accuracy"] - stored[r["seed"]]["heldout_accuracy"][model] for r in runs]
        cells = []
        for rule in rules:
            ens = [ensembles[id(r)][rule] for r in runs]
            d = [a - as_stored[r["seed"]][rule] for a, r in zip(ens, runs, strict=True)]
            cells += [f"{statistics.mean(ens):.3f}", f"{statistics.mean(d):+.3f} (t {t_text(d)})"]
        lines.append(f"| {model} | {variant} | {len(runs)} | {statistics.mean(member):.3f} | {statistics.mean(diff):+.3f} "
                     f"| {t_text(diff)} | {_better_worse(diff)} "
                     f"| {sum(abs(d) <= 1e-9 for d in diff)} of {len(runs)} | " + " | ".join(cells) + " |")  # fmt: skip
        if variant == "views":
            view_lines += _view_table(model, runs, stored)
    base_lines = _base_table(by, {r_id: e[SHIPPED_RULE] for r_id, e in ensembles.items()})
    return "\n".join(lines + ([""] + view_lines if view_lines else []) + ([""] + base_lines if base_lines else []))


def _ensembles(probs: dict, flagged: list[str], rules: tuple[str, ...]) -> dict[str, float]:
    """Held-out accuracy of the ensemble each rule in `rules` picks on validation from `probs`."""
    weights = candidate_rules(probs, flagged)[1]
    return {rule: _mixed_accuracy(probs["heldout"]["label"], probs["heldout"], weights[rule]) for rule in rules}


def _better_worse(diff: list[float]) -> str:
    """How many of the paired differences are above zero / below zero."""
    return f"{sum(d > 1e-9 for d in diff)} / {sum(d < -1e-9 for d in diff)}"


def _kind(row: dict) -> str:
    return json.dumps(row.get("machine"), sort_keys=True)


def _base_table(by: dict[tuple[str, str], list[dict]], shipped: dict[int, float]) -> list[str]:
    """Markdown lines: each variant paired seed by seed with the `base` run of the same model and seed on the same
    kind of machine. `by` holds table()'s rows by (model, variant), `shipped` the held-out accuracy of the
    ensemble the shipped rule picks with each row's member set into the stored row (by the row's id). Another
    kind of CPU moves a model by a face or two (the control then differs from the stored rows), and this pairing
    leaves that out. Empty without such pairs."""
    base = {
        (r["model"], r["seed"], _kind(r)): r for (_, variant), runs in by.items() if variant == "base" for r in runs
    }
    paired: dict[tuple[str, str], list[tuple[dict, dict]]] = {}
    for (model, variant), runs in by.items():
        for r in runs:
            control = base.get((model, r["seed"], _kind(r)))
            if variant != "base" and control is not None:
                paired.setdefault((model, variant), []).append((r, control))
    if not paired:
        return []
    lines = ["Paired with the `base` run of the same seed on the same kind of machine:", "",
             "| model | variant | seeds | member held-out | base | difference | t | better / worse "
             "| ensemble, shipped rule | base's | difference (t) |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for (model, variant), pairs in sorted(paired.items()):
        pairs.sort(key=lambda pair: pair[0]["seed"])
        member = [r["heldout_accuracy"] for r, _ in pairs]
        controls = [c["heldout_accuracy"] for _, c in pairs]
        diff = [a - b for a, b in zip(member, controls, strict=True)]
        ens = [shipped[id(r)] for r, _ in pairs]
        ens_base = [shipped[id(c)] for _, c in pairs]
        d = [a - b for a, b in zip(ens, ens_base, strict=True)]
        lines.append(f"| {model} | {variant} | {len(pairs)} | {statistics.mean(member):.3f} | "
                     f"{statistics.mean(controls):.3f} | {statistics.mean(diff):+.3f} | {t_text(diff)} "
                     f"| {_better_worse(diff)} | {statistics.mean(ens):.3f} "
                     f"| {statistics.mean(ens_base):.3f} | {statistics.mean(d):+.3f} ({t_text(d)}) |")  # fmt: skip
    return lines


def _view_table(model: str, runs: list[dict], stored: dict[int, dict]) -> list[str]:
    out = [f"Test-time views of {model} ({len(runs)} seeds): the member alone, and averaged with MobileNetV2's "
           "stored P(male) (the CNN + MobileNetV2 pair, the best fixed pair of the stored rows)" if model == "cnn"
           else f"Test-time views of {model} ({len(runs)} seeds):", "",
           "| views | member held-out | vs as shipped | t | better / worse | with the stored MobileNetV2 |",
           "|---|---|---|---|---|---|"]  # fmt: skip
    first = None
    for name, views in VIEW_SETS.items():
        accs, pair = [], []
        for r in runs:
            y = np.asarray(r["probabilities"]["heldout"]["label"])
            p = np.mean([r["views"][v] for v in views], axis=0)
            accs.append(float(((p >= 0.5) == y).mean()))
            other = np.asarray(stored[r["seed"]]["probabilities"]["heldout"]["mobilenetv2"], dtype=float)
            pair.append(float((((p + other) / 2 >= 0.5) == y).mean()))
        first = first or accs
        diff = [a - b for a, b in zip(accs, first, strict=True)]
        counts = _better_worse(diff)
        paired = "" if model == "mobilenetv2" else f"{statistics.mean(pair):.3f}"
        out.append(
            f"| {name} | {statistics.mean(accs):.3f} | {statistics.mean(diff):+.3f} | {t_text(diff)} | {counts} | {paired} |"
        )
    return out


def _child(seed: int, model: str, variant: str, threads: int, recipe: str = "", image_size: int | None = None,
           epochs: int | None = None, profile: dict | None = None) -> dict:  # fmt: skip
    profile = profile or {}
    cmd = [sys.executable, __file__, "--one", str(seed), "--model", model, "--variant", variant, "--recipe", recipe,
           *(["--image-size", str(image_size)] if image_size else []),
           *(["--epochs", str(epochs)] if epochs else []),
           *(["--learning-rate", repr(profile["learning_rate"])] if "learning_rate" in profile else []),
           *(["--batch-size", str(profile["batch_size"])] if "batch_size" in profile else [])]  # fmt: skip
    env = {**os.environ, "GENDER_TORCH_THREADS": str(threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        tail = (done.stderr or done.stdout)[-2000:]
        return {"seed": seed, "model": model, "variant": variant, "error": f"exit {done.returncode}: {tail}"}
    return json.loads(lines[-1].removeprefix("RESULT "))


def main(argv: list[str] | None = None) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from gender_tasks.models.registry import get_model_spec

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="cnn")
    parser.add_argument("--variant", choices=VARIANTS, default="erase")
    parser.add_argument("--recipe", default="", help="KEY=VALUE,...: the recipe's changes, for --variant recipe")
    parser.add_argument("--image-size", type=int, help="PX: the member's input size, for --variant size")
    parser.add_argument("--epochs", type=int, help="N: the member's epochs, for --variant epochs")
    parser.add_argument("--learning-rate", type=float, help="X: the member's peak learning rate, for --variant rate")
    parser.add_argument("--batch-size", type=int, help="N: the member's batch size, for --variant batch")
    parser.add_argument("--seeds", default="0,1,2,3,4,5,6,7,8,9")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, one torch thread each (as the stored rows)")
    parser.add_argument("--out", type=Path, default=Path("member-variants.jsonl"))
    parser.add_argument(
        "--against",
        type=Path,
        default=Path(__file__).resolve().parent / "heldout-one-thread.jsonl",
        help="bench/heldout.py rows to set the member into (those of the plan in force are read)",
    )
    parser.add_argument("--table", type=Path, help="print the tables of this --out file and exit")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    recipe = parse_recipe(parser, args.recipe)
    if (args.variant == "recipe") != bool(recipe):
        parser.error("--recipe KEY=VALUE,... goes with --variant recipe, and only with it")
    if (args.variant == "size") != (args.image_size is not None):
        parser.error("--image-size PX goes with --variant size, and only with it")
    if (args.variant == "epochs") != (args.epochs is not None):
        parser.error("--epochs N goes with --variant epochs, and only with it")
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs: expected 1 or more, got {args.epochs}")
    if (args.variant == "rate") != (args.learning_rate is not None):
        parser.error("--learning-rate X goes with --variant rate, and only with it")
    if args.learning_rate is not None and not 0 < args.learning_rate < 1:
        parser.error(f"--learning-rate: expected a number between 0 and 1, got {args.learning_rate}")
    if (args.variant == "batch") != (args.batch_size is not None):
        parser.error("--batch-size N goes with --variant batch, and only with it")
    if args.batch_size is not None and args.batch_size < 2:
        parser.error(f"--batch-size: expected 2 or more, got {args.batch_size}")
    profile = {key: value for key, value in (("learning_rate", args.learning_rate), ("batch_size", args.batch_size))
               if value is not None}  # fmt: skip
    smallest = get_model_spec(args.model).min_image_size
    if args.image_size is not None and args.image_size < smallest:
        parser.error(f"--image-size: {args.model} needs at least {smallest} px, got {args.image_size}")
    if args.one is not None:
        print(
            "RESULT "
            + json.dumps(one_run(args.one, args.model, args.variant, recipe, args.image_size, args.epochs, profile)),
            flush=True,
        )
        return
    stored = _done(args.against, FRACTION)
    if args.table:
        print(table(_rows(args.table), stored))
        return
    try:
        seeds = sorted({int(s) for s in args.seeds.split(",") if s.strip()})
    except ValueError:
        parser.error(f"--seeds: expected whole numbers separated by commas, got {args.seeds!r}")
    missing = [s for s in seeds if s not in stored]
    if missing:
        parser.error(f"--seeds {missing}: no row of the plan in force in {args.against} to compare with")
    variant = variant_name(args.variant, recipe, args.image_size, args.epochs, profile)
    done = {(r["seed"], r["model"], r["variant"]) for r in _rows(args.out)}
    todo = [s for s in seeds if (s, args.model, variant) not in done]
    print(f"{len(todo)} runs to go, {args.jobs} at a time, one torch thread each", flush=True)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for row in pool.map(
            lambda s: _child(s, args.model, args.variant, 1, args.recipe, args.image_size, args.epochs, profile), todo
        ):
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(row["seed"], args.model, variant, row.get("error") or round(row["heldout_accuracy"], 3),
                  row.get("seconds"), flush=True)  # fmt: skip
    print(table(_rows(args.out), stored))


if __name__ == "__main__":
    main()
