"""Input size: one model trained at several input sizes, scored on faces the runs never saw.

    .venv/bin/python bench/input_size.py --model cnn --sizes 64,96 --seeds 0,1,2,3,4,5,6,7,8,9 --out bench/input-size.jsonl
    .venv/bin/python bench/input_size.py --table bench/input-size.jsonl        # the markdown table only

The recipe ablation (issue 11) left "80 / 96 px" queued. This measures it where it matters, on faces the run
never saw: each seed sets aside bench/heldout.py's held-out faces (the same draw, near-duplicate groups kept
whole: `heldout.set_aside`), runs the pipeline on the rest as `make run` does (`cpu` profile, that seed, split
70/15/15, label audit off) training only --model, with its `cpu` plan at --size pixels (epochs and min_steps as
registered), and scores the set-aside faces with the stored model, as the pipeline's external evaluation does
(`evaluation.external.predict_streamed`: each model at its own input size).

Only the one model trains, so a row costs that model's training (the CNN: about 26 s at 64 px and 67 s at
96 px on this project's 2-core VMs); the ensemble is not measured (bench/heldout.py measures it, with all four
models). Each run is a child process (the plan change stays in it) that appends one JSON line to --out: the
held-out and test accuracy, the held-out P(male) (4 decimals, with the labels), seconds and the machine. A
rerun with the same --out skips the (seed, model, size) runs already there. `--table` prints, per model and
size, the means and the paired difference, seed by seed, against the size its `cpu` plan registers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heldout import DRAW, FRACTION, MODELS, train_alone  # noqa: E402 - the bench folder's own helpers
from scale_bench import machine, replace_cpu_plan  # noqa: E402


def one_run(seed: int, model: str, size: int) -> dict:
    """In a child process: set the faces aside, train `model` at `size` px on the rest, score the held-out part."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    from gender_tasks.models.registry import get_model_spec

    replace_cpu_plan(model, image_size=size)
    plan = get_model_spec(model).profiles["cpu"]
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="input-size-"))
    try:
        done = train_alone(seed, model, work, f"input-size-{seed}")
        trained, prob = done["trained"], done["prob"]
        labels = [int(v == "male") for v in done["held"]["label"]]
        correct = sum(int(p >= 0.5) == y for p, y in zip(prob, labels, strict=True))
        return {
            "seed": seed, "fraction": FRACTION, "draw": DRAW, "model": model, "image_size": size,
            "epochs": plan.epochs, "min_steps": plan.min_steps,
            "heldout_accuracy": correct / len(labels), "heldout_images": len(labels),
            "test_accuracy": trained["test_accuracy"], "seconds": round(time.perf_counter() - started, 1),
            "machine": machine(),
            "heldout": {"label": labels, "prob_male": [round(float(p), 4) for p in prob]},
        }  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _key(row: dict) -> tuple:
    return row["seed"], row["model"], row["image_size"]


def _rows(out: Path) -> list[dict]:
    if not out.exists():
        return []
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    return [r for r in rows if "error" not in r]


def registered_size(model: str) -> int:
    from gender_tasks.models.registry import get_model_spec

    return get_model_spec(model).profiles["cpu"].image_size


def table(rows: list[dict], base_size: dict[str, int] | None = None) -> str:
    """Markdown: per model and size, the mean held-out and test accuracy over the seeds that size has, how many
    seeds reach 0.90 on the held-out faces, seconds a run, and the paired difference against the model's
    registered size (`base_size`: {model: px}, the registry's when None) over the seeds both have."""
    lines = ["| model | px | seeds | held-out | test | held-out >= 0.90 | s a run | held-out vs base, paired "
             "| t | better / worse / level |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    by: dict[tuple[str, int], dict[int, dict]] = {}
    for r in rows:
        by.setdefault((r["model"], r["image_size"]), {})[r["seed"]] = r
    for (model, size), runs in sorted(by.items()):
        base = by.get((model, (base_size or {}).get(model) or registered_size(model)), {})
        seeds = sorted(runs)
        mean = statistics.mean
        head = (f"| {model} | {size} | {len(seeds)} | {mean(runs[s]['heldout_accuracy'] for s in seeds):.3f} "
                f"| {mean(runs[s]['test_accuracy'] for s in seeds):.3f} "
                f"| {sum(runs[s]['heldout_accuracy'] >= 0.90 for s in seeds)} of {len(seeds)} "
                f"| {mean(runs[s]['seconds'] for s in seeds):.0f} |")  # fmt: skip
        common = sorted(set(seeds) & set(base))
        if runs is base or not common:
            lines.append(head + " base | | |")
            continue
        diff = [runs[s]["heldout_accuracy"] - base[s]["heldout_accuracy"] for s in common]
        spread = statistics.stdev(diff) if len(diff) > 1 else 0.0
        t = f"{mean(diff) / (spread / len(diff) ** 0.5):.1f}" if spread else "n/a"
        counts = (sum(d > 1e-9 for d in diff), sum(d < -1e-9 for d in diff), sum(abs(d) <= 1e-9 for d in diff))
        lines.append(head + f" {mean(diff):+.4f} ({len(common)} seeds) | {t} | {' / '.join(map(str, counts))} |")
    return "\n".join(lines)


def _child(seed: int, model: str, size: int) -> dict:
    cmd = [sys.executable, __file__, "--one", str(seed), "--model", model, "--sizes", str(size)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        tail = (done.stderr or done.stdout)[-2000:]
        return {"seed": seed, "model": model, "image_size": size, "error": f"exit {done.returncode}: {tail}"}
    return json.loads(lines[-1].removeprefix("RESULT "))


def _whole_numbers(parser, option: str, text: str, minimum: int) -> list[int]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items or any(not item.isdigit() or int(item) < minimum for item in items):
        parser.error(f"{option}: expected whole numbers of at least {minimum}, separated by commas; got {text!r}")
    return [int(item) for item in items]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="cnn")
    parser.add_argument("--sizes", default="64,96", help="input sizes in px, separated by commas")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", type=Path, default=Path("input-size.jsonl"))
    parser.add_argument("--table", type=Path, help="print the table of this --out file and exit")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.table:
        print(table(_rows(args.table)))
        return
    from gender_tasks.models.registry import get_model_spec

    sizes = _whole_numbers(parser, "--sizes", args.sizes, get_model_spec(args.model).min_image_size)
    seeds = _whole_numbers(parser, "--seeds", args.seeds, 0)
    if args.one is not None:
        print("RESULT " + json.dumps(one_run(args.one, args.model, sizes[0])), flush=True)
        return
    done = {_key(r) for r in _rows(args.out)}
    todo = [(s, args.model, px) for px in sizes for s in seeds if (s, args.model, px) not in done]
    print(f"{len(todo)} runs to go, one at a time (each trains on every core)", flush=True)
    for seed, model, size in todo:
        result = _child(seed, model, size)
        with args.out.open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(seed, model, size, result.get("error") or round(result["heldout_accuracy"], 3), result.get("seconds"))
    print(table(_rows(args.out)))


if __name__ == "__main__":
    main()
