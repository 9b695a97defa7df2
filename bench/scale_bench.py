"""Scale: wall time and peak memory of each pipeline step at growing dataset sizes.

    .venv/bin/python bench/scale_bench.py --sizes 1000,10000 [--steps ingest,split,...] [--out results.json]

For each size N it generates N distinct labeled faces (random crop, rotation, flip and colour change
of a face from ../shared/data/generated_photos, 96 px JPEGs, in a temp folder outside the repo),
then runs each step in its own subprocess, in order, on local storage in that folder:

  ingest           pipeline.ingest (scan, sha256, decode check, phash, store)
  split            pipeline.split (near-identical grouping at split_group_distance, balanced split)
  validate         pipeline.validate (Great Expectations suite + near-duplicates across splits)
  preprocess       gender_tasks.data.shards.write_shards at 64 px (decode in worker processes)
  near_duplicates  the all-pairs near-duplicate search alone, at 4 bits (multi-index hashing)
  cnn_epoch        one epoch of build_model('cnn', 64) on the training split, batches streamed from the shards

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
STEPS = ("ingest", "split", "validate", "preprocess", "near_duplicates", "cnn_epoch")
IMAGE_PX = 96
TRAIN_PX = 64
BATCH = 64


# --- generating N distinct faces -----------------------------------------------------------------


def _sources(source: Path = SOURCE) -> list[tuple[Path, str]]:
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


def _shard_prefix(dataset_id: str) -> str:
    return f"datasets/{dataset_id}/cache/{TRAIN_PX}px-shards"


def _split_manifest(state: dict):
    from gender_tasks.data.manifest import read_manifest
    from gender_tasks.storage import open_storage

    storage = open_storage(state["settings"]["storage"])
    return storage, read_manifest(storage, state["split_info"]["split_key"])


def step_ingest(state: dict, workdir: Path) -> dict:
    from gender_tasks import pipeline

    settings = pipeline.prepare({"source": str(workdir / "faces"), "storage": str(workdir / "store"), "min_rows": 10})
    state["settings"] = settings
    state["dataset"] = pipeline.ingest(settings)
    return {"images": state["dataset"].get("images", "")}


def step_split(state: dict, workdir: Path) -> dict:
    from gender_tasks import pipeline

    state["split_info"] = pipeline.split(state["settings"], state["dataset"])
    return {"counts": state["split_info"]["counts"]}


def step_validate(state: dict, workdir: Path) -> dict:
    from gender_tasks import pipeline
    from gender_tasks.data.validate import ValidationFailed

    try:
        summary = pipeline.validate(state["settings"], state["split_info"])
        return {"passed": True, "near_duplicate_count": summary["near_duplicate_count"]}
    except ValidationFailed as exc:
        return {"passed": False, "failed": [f["says"] for f in exc.failures]}


def step_preprocess(state: dict, workdir: Path) -> dict:
    from gender_tasks.data.manifest import decodable_mask
    from gender_tasks.data.shards import write_shards

    storage, manifest = _split_manifest(state)
    rows = manifest[decodable_mask(manifest)].drop_duplicates("sha256")
    index = write_shards(storage, _shard_prefix(state["dataset"]["dataset_id"]), rows["sha256"], rows["key"], TRAIN_PX)
    return {"shards": index["shard_count"]}


def step_near_duplicates(state: dict, workdir: Path) -> dict:
    from gender_tasks.data.near_duplicates import hashes_to_uint64, pairs_within

    _, manifest = _split_manifest(state)
    hashes = hashes_to_uint64(manifest.loc[manifest["phash"].astype(str) != "", "phash"])
    started = time.perf_counter()
    pairs = pairs_within(hashes, 4)
    return {"pairs_within_4_bits": len(pairs), "search_s": round(time.perf_counter() - started, 3)}


def step_cnn_epoch(state: dict, workdir: Path) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from gender_tasks.data.shards import ShardReader, iterate_batches
    from gender_tasks.models.network import build_model

    torch.set_num_threads(int(os.environ.get("GENDER_TORCH_THREADS", 0)) or os.cpu_count())
    storage, manifest = _split_manifest(state)
    reader = ShardReader(storage, _shard_prefix(state["dataset"]["dataset_id"]), cache_dir=workdir / "local-cache")
    train = manifest[manifest["split"] == "train"].drop_duplicates("sha256")
    rows = reader.indices_of(train["sha256"])
    labels = (train["label"] == "female").to_numpy(np.float32)
    model = build_model("cnn", TRAIN_PX)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    total = 0.0
    # memory_budget=0: always stream, the path a dataset larger than memory takes.
    for images, target in iterate_batches(reader, rows, labels, BATCH, seed=0, memory_budget=0, workers=1):
        x = images.permute(0, 3, 1, 2).float().div_(255.0)
        loss = F.binary_cross_entropy_with_logits(model(x).squeeze(1), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += loss.item() * len(target)
    return {"train_images": len(rows), "mean_loss": round(total / max(len(rows), 1), 4)}


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


def measure(step: str, workdir: Path) -> dict:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, __file__, "--run-step", step, "--workdir", str(workdir)],
                          capture_output=True, text=True)  # fmt: skip
    seconds = time.monotonic() - started
    if proc.returncode:
        raise SystemExit(f"step {step} failed in {workdir}:\n{proc.stderr[-4000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return {"step": step, "seconds": round(seconds, 2), **json.loads(line[len("RESULT ") :])}


def bench_size(n: int, steps: list[str], keep: bool) -> list[dict]:
    workdir = Path(tempfile.mkdtemp(prefix=f"gender-scale-{n}-"))
    try:
        started = time.monotonic()
        generate_faces(n, workdir / "faces")
        print(f"N={n}: generated {n} faces in {time.monotonic() - started:.1f}s in {workdir}", flush=True)
        results = []
        for step in steps:
            results.append({"n": n, **measure(step, workdir)})
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
    results = [r for n in sizes for r in bench_size(n, steps, args.keep)]
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    print(markdown(results, sizes, steps))


if __name__ == "__main__":
    main()
