"""The Python half of bench/gpu_check.sh: each part of the GPU verification as a subcommand.

    faces N OUT --source DIR --px P      N distinct faces (bench/scale_bench.py's variants of DIR's faces)
    weights OUT                          torchvision-shaped random state dicts, <model>.pth, as `weights`
    paper STORE OUT                      the figures of the run in STORE (per model: wall time, images/s, ...)
    job STORE --model M ...              one training (epochs over the cached split) in this process
    concurrency STORE OUT --levels ...   the four models as jobs, 1, 2, 4 at a time on one GPU
    compile STORE OUT --model M ...      one model's jobs with and without torch.compile
    summarise RESULTS_DIR                results.json and summary.md from the parts' JSON and nvidia-smi CSVs

Every part writes JSON; the summary reads what is there, so a part that failed or ran out of time
shows as missing instead of sinking the rest.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODELS_SLOWEST_FIRST = ("inceptionv3", "resnet50", "mobilenetv2", "cnn")
TORCHVISION_BUILDERS = {"resnet50": ("resnet50", {}), "mobilenetv2": ("mobilenet_v2", {}),
                        "inceptionv3": ("inception_v3", {"aux_logits": True, "init_weights": False})}  # fmt: skip


def _write(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1, default=str))
    print(json.dumps(data, default=str)[:2000], flush=True)


# --- data and weights ----------------------------------------------------------------------------


def cmd_faces(args) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    from scale_bench import generate_faces

    t0 = time.perf_counter()
    generate_faces(args.n, Path(args.out), source=Path(args.source), px=args.px, interleave=True)
    print(f"{args.n} faces at {args.px} px in {time.perf_counter() - t0:.1f}s", flush=True)


def cmd_weights(args) -> None:
    """Random weights with torchvision's exact state-dict keys and shapes: the pipeline loads them as it
    would ImageNet's (`weights=<folder>`), so the paper profile runs where nothing can be downloaded."""
    import torch
    from torchvision import models as tvm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from gender_tasks.models.network import build_model
    from gender_tasks.models.registry import get_model_spec

    for name, (builder, kwargs) in TORCHVISION_BUILDERS.items():
        torch.save(getattr(tvm, builder)(weights=None, **kwargs).state_dict(), out / f"{name}.pth")
        build_model(name, get_model_spec(name).min_image_size, str(out))  # loads it strictly, as a run will
    print(f"random state dicts for {sorted(TORCHVISION_BUILDERS)} in {out}, each loaded into its model", flush=True)


# --- the paper run's figures ---------------------------------------------------------------------


def cmd_paper(args) -> None:
    store = Path(args.store)
    # The newest run; one stopped part-way (out of time) still has the metrics of the models it finished.
    runs = sorted({m.parents[2] for m in (store / "runs").glob("*/models/*/metrics.json")},
                  key=lambda p: p.stat().st_mtime)  # fmt: skip
    out = {"run_seconds": args.seconds, "exit_code": args.rc, "models": {}}
    if runs:
        run = runs[-1]
        out["run"] = run.name
        for metrics in sorted(run.glob("models/*/metrics.json")):
            m = json.loads(metrics.read_text())
            history = json.loads((metrics.parent / "history.json").read_text())
            out["models"][m["model"]] = {
                "train_seconds": m["train_seconds"], "mean_images_per_s": m["mean_images_per_s"],
                "epochs": m["epochs"], "image_size": m["image_size"], "device": m["device"],
                "device_name": m["device_name"], "peak_device_memory_mb": m.get("peak_device_memory_mb"),
                "test_accuracy": (m.get("test") or {}).get("accuracy"),
                "epoch_seconds": [round(h["seconds"], 2) for h in history],
            }  # fmt: skip
        if (run / "results.json").exists():
            out["task_durations"] = _find_key(json.loads((run / "results.json").read_text()), "task_durations")
        out["training_wall_seconds"] = sum(v["train_seconds"] for v in out["models"].values())
    _write(Path(args.out), out)


def _find_key(data, key: str):
    if isinstance(data, dict):
        if key in data:
            return data[key]
        for value in data.values():
            found = _find_key(value, key)
            if found is not None:
                return found
    return None


# --- one training job, and jobs side by side -----------------------------------------------------


def _locate(store: Path) -> tuple[str, str]:
    """The dataset id and split key of the one dataset in a local store."""
    (split,) = sorted(store.glob("datasets/*/splits/*.csv"))[:1] or [None]
    if split is None:
        sys.exit(f"no split dataset under {store}: run the pipeline into it first")
    return split.parts[-3], str(split.relative_to(store))


def cmd_job(args) -> None:
    """Train one model for `epochs` over (at most `limit` images of) the training split and predict
    the validation split, as the trainer does; report seconds per epoch."""
    import numpy as np
    import torch

    from gender_tasks import layout
    from gender_tasks.data.manifest import read_manifest
    from gender_tasks.data.shards import ShardReader, memory_budget
    from gender_tasks.environment import get_text
    from gender_tasks.models.network import set_backbone_frozen
    from gender_tasks.settings import resolve_settings
    from gender_tasks.storage import open_storage
    from gender_tasks.training.batches import load_splits
    from gender_tasks.training.devices import make_autocast, peak_memory_mb, pick_device
    from gender_tasks.training.loop import epoch_generator, predict_proba, setup_model, train_one_epoch

    started = time.perf_counter()
    store = Path(args.store)
    dataset_id, split_key = _locate(store)
    storage = open_storage(str(store))
    settings = resolve_settings({"profile": args.profile, "models": [args.model], "weights": "none"})
    size = settings.per_model[args.model].image_size
    manifest = read_manifest(storage, split_key)
    device = pick_device()
    reader = ShardReader(storage, layout.cache_prefix(dataset_id, size))
    splits = load_splits(manifest, reader, ("train", "val"), memory_budget(), device)
    train, val = splits["train"], splits["val"]
    if args.limit:
        train = train.subset(np.arange(min(args.limit, len(train))))
    autocast = make_autocast(device)
    model, inputs = setup_model(args.model, size, "none", 0, device)
    set_backbone_frozen(args.model, model, False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ready = time.perf_counter()
    epochs = []
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        train_one_epoch(model, args.model, train, inputs, opt, epoch_generator(0, epoch), settings.batch_size,
                        autocast)  # fmt: skip
        predict_proba(model, val, inputs, settings.batch_size * 2, autocast)
        epochs.append(time.perf_counter() - t0)
    done = time.perf_counter()
    _write(Path(args.out), {"model": args.model, "size": size, "train_images": len(train), "val_images": len(val),
                            "setup_seconds": ready - started, "epoch_seconds": epochs, "total_seconds": done - started,
                            "train_images_per_s": len(train) * len(epochs) / sum(epochs),
                            "compile": get_text("GENDER_TORCH_COMPILE") or "", "device": str(device),
                            "peak_device_memory_mb": peak_memory_mb(device)})  # fmt: skip


def _job_command(store: str, model: str, out: Path, args) -> list[str]:
    cmd = [sys.executable, __file__, "job", store, "--model", model, "--epochs", str(args.epochs), "--out", str(out),
           "--profile", args.profile]  # fmt: skip
    return cmd + (["--limit", str(args.limit)] if args.limit else [])


def cmd_concurrency(args) -> None:
    """The four models as one job each, run `level` at a time (slowest first, as the pool would): the
    wall time of all four at each level. Lower at 2 or 4 than at 1: sharing the GPU pays."""
    models = args.models.split(",")
    out_dir = Path(args.out).parent / "concurrency"
    out_dir.mkdir(exist_ok=True)
    results = {"models": models, "epochs": args.epochs, "limit": args.limit, "levels": {}}
    for level in [int(x) for x in args.levels.split(",")]:
        queue, running, t0 = list(enumerate(models)), [], time.perf_counter()
        while queue or running:
            while queue and len(running) < level:
                i, model = queue.pop(0)
                path = out_dir / f"level{level}-{i}-{model}.json"
                running.append((subprocess.Popen(_job_command(args.store, model, path, args), stdout=subprocess.DEVNULL),
                                path))  # fmt: skip
            time.sleep(0.2)
            for proc, path in [r for r in running if r[0].poll() is not None]:
                running.remove((proc, path))
                if proc.returncode != 0:
                    sys.exit(f"a concurrency job ({path.name}) failed with exit code {proc.returncode}")
        wall = time.perf_counter() - t0
        jobs = {
            f"{i}-{m}": json.loads((out_dir / f"level{level}-{i}-{m}.json").read_text()) for i, m in enumerate(models)
        }
        results["levels"][str(level)] = {"wall_seconds": wall, "jobs": jobs}
        _write(Path(args.out), results)
    one = results["levels"].get("1", {}).get("wall_seconds")
    for r in results["levels"].values():
        r["speedup_vs_1"] = one / r["wall_seconds"] if one else None
    _write(Path(args.out), results)


def cmd_compile(args) -> None:
    """One model's job eager and compiled: compile overhead (first epoch) and steady epoch time, and the
    epochs after which compiling has paid for itself at this split size."""
    out_dir = Path(args.out).parent / "compile"
    out_dir.mkdir(exist_ok=True)
    runs = {}
    for label, value in (("eager", "0"), ("compiled", args.backend)):
        path = out_dir / f"{args.model}-{label}.json"
        env = {**os.environ, "GENDER_TORCH_COMPILE": value}
        subprocess.run(_job_command(args.store, args.model, path, args), check=True, env=env, stdout=subprocess.DEVNULL)
        runs[label] = json.loads(path.read_text())
    eager, comp = runs["eager"]["epoch_seconds"], runs["compiled"]["epoch_seconds"]
    steady_eager, steady_comp = min(eager[1:] or eager), min(comp[1:] or comp)
    overhead = comp[0] - eager[0] - (steady_comp - steady_eager)
    gain = steady_eager - steady_comp
    result = {"model": args.model, "backend": args.backend, "runs": runs, "steady_epoch_eager_s": steady_eager,
              "steady_epoch_compiled_s": steady_comp, "speedup": steady_eager / steady_comp if steady_comp else None,
              "compile_overhead_s": overhead,
              "break_even_epochs": overhead / gain if gain > 0 else None,
              "pays_for_10_epochs": bool(gain > 0 and overhead < 10 * gain)}  # fmt: skip
    _write(Path(args.out), result)


# --- the summary ---------------------------------------------------------------------------------


def _smi(path: Path) -> dict | None:
    """Mean and peak utilisation and peak memory from an nvidia-smi CSV (index, util %, memory MiB)."""
    rows = []
    with path.open() as f:
        for row in csv.reader(f):
            try:
                rows.append((float(row[1]), float(row[2])))
            except (IndexError, ValueError):
                continue
    if not rows:
        return None
    util = [u for u, _ in rows]
    return {"samples": len(rows), "mean_util_pct": sum(util) / len(util), "max_util_pct": max(util),
            "max_memory_mib": max(m for _, m in rows)}  # fmt: skip


def cmd_summarise(args) -> None:
    results = Path(args.results)
    parts = {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json")) if p.name != "results.json"}
    timings = {}
    if (results / "timings.tsv").exists():
        for line in (results / "timings.tsv").read_text().splitlines():
            part, rc, seconds = line.split("\t")
            timings[part] = {"exit_code": int(rc), "seconds": float(seconds)}
    smi = {p.stem.removeprefix("smi-"): _smi(p) for p in sorted(results.glob("smi-*.csv"))}
    summary = {"parts": timings, "nvidia_smi": smi, **parts}
    (results / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    (results / "summary.md").write_text(markdown(summary))
    print((results / "summary.md").read_text())


def _f(value, fmt: str = ".1f") -> str:
    return "-" if value is None else format(value, fmt)


def markdown(s: dict) -> str:
    env = s.get("environment", {})
    lines = ["# bench/gpu_check.sh results", "",
             f"Device: {env.get('device', '?')}; torch {env.get('torch', '?')}; mode {env.get('mode', '?')}; "
             f"{env.get('faces', '?')} faces; started {env.get('started', '?')}", "",
             "## Parts", "", "| part | exit | seconds | GPU util mean % | GPU util max % | GPU memory max MiB |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for part, t in s.get("parts", {}).items():
        g = (s.get("nvidia_smi") or {}).get(part) or {}
        lines.append(f"| {part} | {t['exit_code']} | {t['seconds']:.1f} | {_f(g.get('mean_util_pct'))} | "
                     f"{_f(g.get('max_util_pct'))} | {_f(g.get('max_memory_mib'), '.0f')} |")  # fmt: skip
    paper = s.get("paper", {})
    lines += ["", f"## The profile run end to end: {_f(paper.get('run_seconds'))} s wall, training "
              f"{_f(paper.get('training_wall_seconds'))} s (sum over models)", "",
              "| model | size | epochs | train s | images/s | peak GPU MB | test acc |", "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, m in paper.get("models", {}).items():
        lines.append(f"| {name} | {m['image_size']} | {m['epochs']} | {m['train_seconds']:.1f} | "
                     f"{m['mean_images_per_s']:.0f} | {_f(m.get('peak_device_memory_mb'), '.0f')} | "
                     f"{_f(m.get('test_accuracy'), '.3f')} |")  # fmt: skip
    if paper.get("task_durations"):
        lines += ["", "Task durations (s): " + ", ".join(f"{k} {v:.1f}" for k, v in paper["task_durations"].items())]
    bench = s.get("train_bench", {})
    lines += ["", f"## Pipeline epoch vs bare loop (bench/train_bench.py, {bench.get('device', '?')}): lowest ratio "
              f"{_f(bench.get('lowest_ratio'), '.3f')} (target >= 0.90)", "",
              "| model | size | train images | pipeline img/s | bare img/s | ratio |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in bench.get("models", []):
        lines.append(f"| {r['model']} | {r['size']} | {r['train_images']} | {r['pipeline_images_per_s']:.0f} | "
                     f"{r['bare_images_per_s']:.0f} | {r['ratio']:.3f} |")  # fmt: skip
    conc = s.get("concurrency", {})
    lines += ["", f"## Concurrent trainings on one GPU ({', '.join(conc.get('models', []))}; {conc.get('epochs')} "
              f"epoch(s) each)", "", "| at once | wall s (all jobs) | speed-up vs 1 |", "|---:|---:|---:|"]  # fmt: skip
    for level, r in conc.get("levels", {}).items():
        lines.append(f"| {level} | {r['wall_seconds']:.1f} | {_f(r.get('speedup_vs_1'), '.2f')} |")
    comp = s.get("compile", {})
    lines += ["", f"## torch.compile ({comp.get('model', '?')}, backend {comp.get('backend', '?')})", "",
              f"steady epoch eager {_f(comp.get('steady_epoch_eager_s'), '.2f')} s, compiled "
              f"{_f(comp.get('steady_epoch_compiled_s'), '.2f')} s (speed-up {_f(comp.get('speedup'), '.2f')}); "
              f"compile overhead {_f(comp.get('compile_overhead_s'))} s; break-even after "
              f"{_f(comp.get('break_even_epochs'))} epochs; pays for 10 epochs: {comp.get('pays_for_10_epochs')}"]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("faces")
    p.add_argument("n", type=int)
    p.add_argument("out")
    p.add_argument("--source", required=True)
    p.add_argument("--px", type=int, default=256)
    sub.add_parser("weights").add_argument("out")
    p = sub.add_parser("paper")
    p.add_argument("store")
    p.add_argument("out")
    p.add_argument("--seconds", type=float)
    p.add_argument("--rc", type=int)
    for name in ("job", "concurrency", "compile"):
        p = sub.add_parser(name)
        p.add_argument("store")
        p.add_argument("--out", required=name == "job")
        p.add_argument("--model", default="resnet50")
        p.add_argument("--models", default=",".join(MODELS_SLOWEST_FIRST))
        p.add_argument("--epochs", type=int, default=2)
        p.add_argument("--limit", type=int)
        p.add_argument("--profile", default="paper")
        p.add_argument("--levels", default="1,2,4")
        p.add_argument("--backend", default="inductor")
        if name != "job":
            p.add_argument("out_path")
    sub.add_parser("summarise").add_argument("results")
    args = parser.parse_args()
    if getattr(args, "out_path", None):
        args.out = args.out_path
    {"faces": cmd_faces, "weights": cmd_weights, "paper": cmd_paper, "job": cmd_job, "concurrency": cmd_concurrency,
     "compile": cmd_compile, "summarise": cmd_summarise}[args.cmd](args)  # fmt: skip


if __name__ == "__main__":
    main()
