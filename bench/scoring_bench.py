"""Batch scoring throughput and peak memory at 10,000 and 100,000 images (not a test).

    .venv/bin/python bench/scoring_bench.py [--sizes 10000,100000] [--batch-size 256]

Generates small face-like JPEGs (48 px, about 1.6 KB each) in a temporary folder outside the repo, trains a
tiny model once (the `tiny` profile's CNN, 32 px, one epoch, on 40 generated faces) into a temporary
local storage, then scores each folder in its own process with gender_tasks.scoring.score_images (read,
sha256, decode, score, per-batch parts, predictions.csv, summary) and reports, per size: wall time,
images/s, the CPU time the scoring used (user + system, imports excluded: steadier than wall time on a
shared machine) and the peak resident memory of that process (ru_maxrss; torch's import alone is about
0.7 GB of it). Then scores the largest folder again:
unchanged images with the same model, which must write nothing. Results are recorded by hand in
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_SCORE = r"""
import json, resource, sys, time
from gender_tasks.scoring import score_images
before = resource.getrusage(resource.RUSAGE_SELF)
cpu_before = before.ru_utime + before.ru_stime  # the imports: not the scoring's
started = time.monotonic()
out = score_images(sys.argv[1], sys.argv[2], batch_size=int(sys.argv[3]))
seconds = time.monotonic() - started
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024,
                  "cpu_seconds": usage.ru_utime + usage.ru_stime - cpu_before,
                  "images": out["images"], "scored": out.get("scored"), "unchanged": out["unchanged"]}))
"""


def face(label: str, rng, size: int = 48):
    """A synthetic face-like image: the class shows in the colour and shape, noise makes each unique."""
    import numpy as np
    from PIL import Image, ImageDraw

    img = Image.fromarray(np.clip(rng.normal(120, 40, (size, size, 3)), 0, 255).astype("uint8"))
    draw, m = ImageDraw.Draw(img), size // 4
    if label == "female":
        draw.ellipse([m, m, size - m, size - m], fill=(230, 90, 120))
    else:
        draw.rectangle([m, m, size - m, size - m], fill=(60, 110, 220))
    return img


def generate(folder: Path, n: int, seed: int) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    for i in range(n):
        sub = folder / f"{i // 1000:03d}"  # 1,000 files a folder, as a camera or export tool would
        if i % 1000 == 0:
            sub.mkdir(parents=True)
        face("female" if i % 2 else "male", rng).save(sub / f"img_{i:06d}.jpg", "JPEG", quality=90)


def train_tiny(work: Path, store: Path) -> str:
    from gender_tasks import pipeline

    for label in ("female", "male"):
        (work / "faces" / label).mkdir(parents=True)
    import numpy as np

    rng = np.random.default_rng(0)
    for i in range(40):
        label = ("female", "male")[i % 2]
        face(label, rng).save(work / "faces" / label / f"{i:03d}.jpg", "JPEG")
    run = pipeline.prepare({"source": str(work / "faces"), "storage": str(store), "profile": "tiny", "epochs": 1,
                            "models": ["cnn"], "min_rows": 10, "label_audit": False}, run_id="bench")  # fmt: skip
    run = pipeline.preprocess(pipeline.validate(pipeline.split(pipeline.ingest(run))))
    trained = [pipeline.train(run, "cnn")]
    pipeline.report(run, trained)
    return run["run_key"]


def score(folder: Path, store: Path, batch_size: int) -> dict:
    env = {"GENDER_TORCH_THREADS": "1", **os.environ, "PYTHONPATH": str(REPO)}  # one thread unless set
    done = subprocess.run([sys.executable, "-c", _SCORE, str(folder), str(store), str(batch_size)], env=env,
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="scoring-bench-"))
    try:
        store = work / "store"
        t = time.monotonic()
        run_key = train_tiny(work, store)
        print(f"trained the tiny cnn (run {run_key}) in {time.monotonic() - t:.1f} s", flush=True)
        rows = []
        for n in sizes:
            folder = work / f"images-{n}"
            t = time.monotonic()
            generate(folder, n, seed=n)
            mb = sum(p.stat().st_size for p in folder.rglob("*.jpg")) / 1e6
            print(f"generated {n:,} images ({mb:.0f} MB) in {time.monotonic() - t:.0f} s", flush=True)
            result = score(folder, store, args.batch_size)
            rows.append((n, result))
            print(f"{n:>7,} images ({result['scored']:,} scored): {result['seconds']:7.1f} s, "
                  f"{n / result['seconds']:6.0f} images/s, {result['cpu_seconds']:7.1f} CPU s, peak RSS "
                  f"{result['peak_rss_mb']:6.0f} MB; load average {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
        again = score(work / f"images-{sizes[-1]}", store, args.batch_size)
        print(f"again, unchanged ({sizes[-1]:,} images): {again['seconds']:.1f} s, unchanged={again['unchanged']}, "
              f"peak RSS {again['peak_rss_mb']:.0f} MB")  # fmt: skip
        if len(rows) > 1:
            (n0, r0), (n1, r1) = rows[0], rows[-1]
            print(f"per-image time ratio {n1 // n0}x: {(r1['seconds'] / n1) / (r0['seconds'] / n0):.2f} wall, "
                  f"{(r1['cpu_seconds'] / n1) / (r0['cpu_seconds'] / n0):.2f} CPU; "
                  f"peak memory ratio: {r1['peak_rss_mb'] / r0['peak_rss_mb']:.2f}")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
