"""Scale: wall time and peak memory of each pipeline step at growing dataset sizes.

    .venv/bin/python bench/scale_bench.py --sizes 1000,10000 [--steps ingest,split,...] [--out results.json]

For each size N it generates N distinct labeled faces (random crop, rotation, flip and colour change
of a face from ../shared/data/generated_photos, 96 px JPEGs, in a temp folder outside the repo),
then runs each step in its own subprocess, in order, on local storage in that folder:

  ingest           pipeline.ingest (scan, sha256, decode check, phash, store)
  split            pipeline.split (near-identical grouping at split_group_distance, balanced split)
  validate         pipeline.validate (Great Expectations suite + near-duplicates across splits)
  preprocess       pipeline.preprocess: the sharded cache at 64 px (decode in worker processes)
  near_duplicates  the all-pairs near-duplicate search alone, at 4 bits (multi-index hashing)
  train            pipeline.train of the CNN for one epoch at 64 px (the training task: shards fetched
                   into a local cache folder, batches streamed from them unless the splits fit
                   --memory-budget-mb, then predictions for every image and the outputs)
  report           pipeline.report over that one model (HTML size in the notes)
  label_audit      pipeline.label_audit, cut to 2 folds of one CNN epoch at 64 px (out-of-fold P(male)
                   for every image: each fold trains on half the images and predicts the other half)

Peak RSS is the step process's own (ru_maxrss) and, separately, the largest of its worker processes.
Prints a markdown table and, per step, the per-image time at each size over that at the previous
size (1.0: linear; 10.0 for a tenfold size: quadratic).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO.parent / "shared" / "data" / "generated_photos"  # the shared faces beside the checkout
STEPS = ("ingest", "split", "validate", "preprocess", "near_duplicates", "train", "report", "label_audit")
IMAGE_PX = 96
RUN_KEY = "scale-bench"


def machine() -> dict:
    """What a benchmark row records of the machine that trained it: the CPU's model name, the kernels torch
    picks on it and the torch version. The same seed trains the same model on the same kind of machine;
    another CPU's floating-point kernels can move a small-set model by a test image or two, so rows compared
    seed by seed should come from one kind (bench/RESULTS.md, "Same seed, another machine")."""
    import torch

    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")] if Path("/proc/cpuinfo").exists() else []  # fmt: skip
    return {"cpu": names[0] if names else "unknown", "capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__}  # fmt: skip


def replace_cpu_plan(name: str, **changes) -> None:
    """Register model `name` with these fields of its `cpu` ProfilePlan changed, in this process only (the
    benchmarks' way to measure a plan before it is adopted)."""
    from dataclasses import replace

    from gender_tasks.models.registry import get_model_spec, register

    spec = get_model_spec(name)
    register(replace(spec, profiles={**spec.profiles, "cpu": replace(spec.profiles["cpu"], **changes)}))


def set_cpu_epochs(epochs: dict[str, int]) -> None:
    """These models' `cpu` plans with these epochs (their min_steps unchanged), in this process only."""
    for name, n in epochs.items():
        replace_cpu_plan(name, epochs=n)


def per_model_option(parser, option: str, text: str, models: tuple[str, ...] | None = None,
                     minimum: int = 0) -> dict[str, int]:  # fmt: skip
    """MODEL=N,... as {model: N}: a usage error naming the option and the item unless N is a whole number of
    at least `minimum` and (where `models` is given) MODEL is one of them."""
    values = {}
    for item in filter(None, text.split(",")):
        name, sep, number = item.partition("=")
        if not sep or not number.isdigit() or int(number) < minimum or (models is not None and name not in models):
            wanted = "MODEL=N" if models is None else f"MODEL=N with MODEL one of {','.join(models)} and N >= {minimum}"
            parser.error(f"{option}: expected {wanted}, got {item!r}")
        values[name] = int(number)
    return values


def parse_epochs(parser, text: str, models: tuple[str, ...]) -> dict[str, int]:
    """--epochs MODEL=N,... as {model: N}: MODEL one of `models`, N >= 1."""
    return per_model_option(parser, "--epochs", text, models, minimum=1)


# --- generating N distinct faces -----------------------------------------------------------------


def _sources(source: Path) -> list[tuple[Path, str]]:
    found = [(p, label) for label in ("female", "male") for ext in ("jpg", "jpeg", "png")
             for p in sorted((source / label).glob(f"*.{ext}"))]  # fmt: skip
    if not found:
        sys.exit(f"no faces under {source}/female and {source}/male: point the benchmark at a folder of faces")
    return found


def _variant(args: tuple) -> None:
    """Face number i: source i mod count, with a crop, rotation, flip and colour change seeded by i."""
    from PIL import Image, ImageEnhance, ImageOps

    i, source, label, out, px = args
    rng = random.Random(i)
    with Image.open(source) as img:
        img = img.convert("RGB")
    img = img.rotate(rng.uniform(-20, 20), resample=Image.Resampling.BILINEAR)
    side = img.width * rng.uniform(0.6, 0.9)
    x, y = rng.uniform(0, img.width - side), rng.uniform(0, img.height - side)
    img = img.resize((px, px), Image.Resampling.BILINEAR, box=(x, y, x + side, y + side))
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhance(img).enhance(rng.uniform(0.7, 1.3))
    img.save(out / label / f"{label}_{i:06d}.jpg", "JPEG", quality=90)


def generate_faces(n: int, folder: Path, source: Path = SOURCE, px: int = IMAGE_PX, interleave: bool = False) -> None:
    """N distinct labeled faces (variants of those under `source`) as px-sized JPEGs in `folder`;
    `interleave` alternates the classes, so that a few faces hold both."""
    sources = _sources(source)
    if interleave:
        by_class = [[s for s in sources if s[1] == label] for label in ("female", "male")]
        sources = [s for pair in itertools.zip_longest(*by_class) for s in pair if s is not None]
    for label in ("female", "male"):
        (folder / label).mkdir(parents=True, exist_ok=True)
    jobs = [(i, *sources[i % len(sources)], folder, px) for i in range(n)]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_variant, jobs, chunksize=256))


# --- one step, in its own process ----------------------------------------------------------------


def _load_state(workdir: Path) -> dict:
    path = workdir / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _split_manifest(state: dict):
    from gender_tasks.data.manifest import read_manifest
    from gender_tasks.storage import open_storage

    storage = open_storage(state["settings"]["storage"])
    return storage, read_manifest(storage, state["split_info"]["split_key"])


def step_ingest(state: dict, workdir: Path) -> dict:
    from gender_tasks import pipeline

    # The CNN alone, one epoch at the cpu profile's 64 px; no label audit (k trainings of the same CNN).
    run = pipeline.prepare({"source": str(workdir / "faces"), "storage": str(workdir / "store"), "min_rows": 10,
                            "profile": "cpu", "models": ["cnn"], "epochs": 1, "label_audit": False},
                           run_id=RUN_KEY)  # fmt: skip
    state["run"] = pipeline.ingest(run)
    state["settings"], state["dataset"] = state["run"]["settings"], state["run"]["dataset"]
    return {"images": state["dataset"].get("images", "")}


def step_split(state: dict, workdir: Path) -> dict:
    from gender_tasks import pipeline

    state["run"] = pipeline.split(state["run"])
    state["split_info"] = state["run"]["split"]
    return {"counts": state["split_info"]["counts"]}


def step_validate(state: dict, workdir: Path) -> dict:
    from gender_tasks import pipeline
    from gender_tasks.data.validate import ValidationFailed

    started = time.monotonic()
    try:
        state["run"] = pipeline.validate(state["run"])
        summary = state["run"]["validation"]
        return {"passed": True, "near_duplicate_count": summary["near_duplicate_count"]}
    except ValidationFailed as exc:
        # Measured, not required: the later steps go on, and the report says the suite failed.
        state["run"]["validation"] = {"success": False, "failed": exc.failures,
                                      "seconds": round(time.monotonic() - started, 2)}  # fmt: skip
        return {"passed": False, "failed": [f["says"] for f in exc.failures]}


def step_preprocess(state: dict, workdir: Path) -> dict:
    from gender_tasks import pipeline

    state["run"] = pipeline.preprocess(state["run"])
    state["caches"] = state["run"]["caches"]
    return {"caches": state["caches"]["cache_prefixes"]}


def step_near_duplicates(state: dict, workdir: Path) -> dict:
    from gender_tasks.data.near_duplicates import hashes_to_uint64, pairs_within

    _, manifest = _split_manifest(state)
    hashes = hashes_to_uint64(manifest.loc[manifest["phash"].astype(str) != "", "phash"])
    started = time.perf_counter()
    pairs = pairs_within(hashes, 4)
    return {"pairs_within_4_bits": len(pairs), "search_s": round(time.perf_counter() - started, 3)}


def step_train(state: dict, workdir: Path) -> dict:
    from gender_tasks import pipeline
    from gender_tasks.data.shards import CACHE_DIR_ENV

    os.environ[CACHE_DIR_ENV] = str(workdir / "local-cache")  # as a worker's GENDER_CACHE_DIR
    out = pipeline.train(state["run"], "cnn")
    state["train"] = out
    return {"test_accuracy": round(out["test_accuracy"], 3)}


def step_report(state: dict, workdir: Path) -> dict:
    from gender_tasks import pipeline

    out = pipeline.report(state["run"], [state["train"]])
    html = Path(out["report_uri"].removeprefix("file://"))
    return {"report_kb": round(html.stat().st_size / 1024) if html.exists() else None}


def step_label_audit(state: dict, workdir: Path) -> dict:
    from gender_tasks import pipeline
    from gender_tasks.data.shards import CACHE_DIR_ENV

    # The audit's own folds and epochs are the profile's (5 x 12 CNN trainings for `cpu`); the bench
    # measures how its cost grows with N at 2 folds of one epoch each (train on half, predict the other).
    os.environ[CACHE_DIR_ENV] = str(workdir / "local-cache")
    settings = {**state["run"]["settings"], "label_audit": True, "label_audit_folds": 2,
                "label_audit_spec": {**state["run"]["settings"]["label_audit_spec"], "epochs": 1}}  # fmt: skip
    out = pipeline.label_audit({**state["run"], "settings": settings})
    return {
        "folds": out["folds"],
        "images": out["images"],
        "out_of_fold_accuracy": round(out["out_of_fold_accuracy"], 3),
    }


def run_step(step: str, workdir: Path) -> None:
    """Child process: run one step, save the state for the next, print a JSON result line."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    state = _load_state(workdir)
    info = globals()[f"step_{step}"](state, workdir)
    (workdir / "state.json").write_text(json.dumps(state))
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print("RESULT " + json.dumps({"info": info, "rss_mb": round(own), "worker_rss_mb": round(workers)}))


# --- the parent: sizes x steps -------------------------------------------------------------------


def measure(step: str, workdir: Path, memory_budget_mb: float) -> dict:
    env = {**os.environ, "GENDER_MEMORY_BUDGET_MB": str(memory_budget_mb)}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, __file__, "--run-step", step, "--workdir", str(workdir)],
                          capture_output=True, text=True, env=env)  # fmt: skip
    seconds = time.monotonic() - started
    if proc.returncode:
        raise SystemExit(f"step {step} failed in {workdir}:\n{proc.stderr[-4000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return {"step": step, "seconds": round(seconds, 2), **json.loads(line[len("RESULT ") :])}


def bench_size(n: int, steps: list[str], keep: bool, memory_budget_mb: float, source: Path) -> list[dict]:
    workdir = Path(tempfile.mkdtemp(prefix=f"gender-scale-{n}-"))
    try:
        started = time.monotonic()
        generate_faces(n, workdir / "faces", source)
        print(f"N={n}: generated {n} faces in {time.monotonic() - started:.1f}s in {workdir}", flush=True)
        results = []
        for step in steps:
            results.append({"n": n, **measure(step, workdir, memory_budget_mb)})
            r = results[-1]
            print(f"N={n} {step}: {r['seconds']}s, {r['rss_mb']} MB, {r['info']}", flush=True)
        return results
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def markdown(results: list[dict], sizes: list[int], steps: list[str]) -> str:
    lines = ["| N | step | wall s | ms / image | peak RSS MB (step) | peak RSS MB (workers) | notes |",
             "|---:|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in results:
        lines.append(f"| {r['n']:,} | {r['step']} | {r['seconds']:.2f} | {1000 * r['seconds'] / r['n']:.2f} | "
                     f"{r['rss_mb']:,} | {r['worker_rss_mb']:,} | {json.dumps(r['info'])} |")  # fmt: skip
    if len(sizes) > 1:
        per_image = {(r["n"], r["step"]): r["seconds"] / r["n"] for r in results}
        pairs = list(zip(sizes, sizes[1:], strict=False))
        lines += ["", "Per-image time ratio (larger size / smaller; 1.0 = linear):", "",
                  "| step | " + " | ".join(f"{b:,} / {a:,}" for a, b in pairs) + " |",
                  "|---|" + "---:|" * len(pairs)]  # fmt: skip
        for step in steps:
            ratios = [per_image[(b, step)] / per_image[(a, step)] for a, b in pairs]
            lines.append(f"| {step} | " + " | ".join(f"{x:.2f}" for x in ratios) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000", help="comma-separated dataset sizes")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, in order, from {STEPS}")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the generated faces and storage")
    parser.add_argument("--memory-budget-mb", type=float, default=0.0,
                        help="GENDER_MEMORY_BUDGET_MB of the steps (default 0: training always streams from "
                             "the shards, the path a dataset larger than memory takes)")  # fmt: skip
    parser.add_argument("--source", type=Path, default=SOURCE, help="faces to vary (female/ and male/ folders)")
    parser.add_argument("--run-step", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_step:
        run_step(args.run_step, args.workdir)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    steps = args.steps.split(",")
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise SystemExit(f"unknown step(s) {unknown}; choose from {STEPS}")
    results = [r for n in sizes for r in bench_size(n, steps, args.keep, args.memory_budget_mb, args.source)]
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    print(markdown(results, sizes, steps))


if __name__ == "__main__":
    main()
