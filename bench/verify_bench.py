"""What verification on read costs: the share of a `make run` spent checking stored bytes.

    .venv/bin/python bench/verify_bench.py [--source ../shared/data/generated_photos] [--profile cpu]

Runs the pipeline's steps in this process, as `make run` does inside Airflow (prepare, ingest, split,
validate, preprocess, every model's training, the ensemble, the label audit, the report), on a fresh
local storage folder, and times, beside the run, every call into the code that exists only to check or
record checksums:

  integrity.verify_bytes / sha256_hex / sha256_file   hashing what is read (and what is recorded)
  storage.recorded_sha256                             reading the checksum records beside objects
  manifest.check_rows                                 manifests checked against their dataset id
  pt2.check_archive                                   model files checked for anything loading would
                                                      unpickle or evaluate, before torch.export.load

Nested calls count once (the outermost), and calls on parallel threads add up, so the share printed is
an upper bound on what verification adds to the run's wall time. Target: at most 5 %.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO.parent / "shared" / "data" / "generated_photos"

_local = threading.local()
_spent: dict[str, float] = defaultdict(float)
_calls: dict[str, int] = defaultdict(int)
_lock = threading.Lock()


def _timed(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if getattr(_local, "depth", 0):
            return fn(*args, **kwargs)
        _local.depth = 1
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _local.depth = 0
            with _lock:
                _spent[name] += time.perf_counter() - started
                _calls[name] += 1

    wrapper.__wrapped_for_bench__ = True
    return wrapper


def instrument() -> None:
    """Replace the checksum functions wherever the package imported them (module attributes by identity)."""
    from gender_tasks import integrity, storage
    from gender_tasks.data import manifest
    from gender_tasks.evaluation import pt2

    targets = {
        integrity.verify_bytes: "verify_bytes",
        integrity.sha256_hex: "sha256_hex",
        integrity.sha256_file: "sha256_file",
        storage.recorded_sha256: "recorded_sha256",
        manifest.check_rows: "check_rows",
        pt2.check_archive: "pt2.check_archive",
    }
    import gender_tasks  # noqa: F401

    for module in [m for name, m in list(sys.modules.items()) if name.startswith("gender_tasks") and m]:
        for attr, value in list(vars(module).items()):
            if callable(value) and value in targets:
                setattr(module, attr, _timed(targets[value], value))


def run_pipeline(source: Path, store: Path, profile: str) -> dict[str, float]:
    from gender_tasks import pipeline
    from gender_tasks.scheduling import training_plan

    steps: dict[str, float] = {}

    def step(name, fn, *args, **kwargs):
        started = time.perf_counter()
        out = fn(*args, **kwargs)
        steps[name] = steps.get(name, 0.0) + time.perf_counter() - started
        return out

    run = step("prepare", pipeline.prepare, {"source": str(source), "storage": str(store), "profile": profile})
    run = step("ingest", pipeline.ingest, run)
    run = step("split", pipeline.split, run)
    run = step("validate", pipeline.validate, run)
    run = step("preprocess", pipeline.preprocess, run)
    trained = [step("train", pipeline.train, run, t["model_name"], repeat=t["repeat"])
               for t in training_plan(run["settings"]["models"], run["settings"]["repeats"])]  # fmt: skip
    ensembled = step("ensemble", pipeline.ensemble, run)
    audit = step("label_audit", pipeline.label_audit, run) if run["settings"]["label_audit"] else None
    step("report", pipeline.report, run, trained, label_audit=audit, ensembled=ensembled)
    return steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, default=SOURCE)
    parser.add_argument("--profile", default="cpu")
    args = parser.parse_args()
    if not args.source.is_dir():
        sys.exit(f"no faces at {args.source}: give --source a folder with female/ and male/")
    import logging

    logging.basicConfig(level=logging.WARNING)
    import gender_tasks.pipeline  # noqa: F401  (loads the modules to instrument)
    import gender_tasks.reporting.report  # noqa: F401
    import gender_tasks.training.ensemble  # noqa: F401
    import gender_tasks.training.label_audit  # noqa: F401
    import gender_tasks.training.trainer  # noqa: F401

    instrument()
    workdir = Path(tempfile.mkdtemp(prefix="verify-bench-"))
    try:
        import os

        os.environ["GENDER_CACHE_DIR"] = str(workdir / "local-cache")
        started = time.perf_counter()
        steps = run_pipeline(args.source, workdir / "store", args.profile)
        total = time.perf_counter() - started
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    spent = sum(_spent.values())
    print(f"pipeline on {args.source} ({args.profile} profile): {total:.1f} s")
    print("| step | seconds |\n|---|---|")
    for name, seconds in steps.items():
        print(f"| {name} | {seconds:.1f} |")
    print("\n| checksum code | calls | seconds |\n|---|---|---|")
    for name in sorted(_spent, key=lambda n: -_spent[n]):
        print(f"| {name} | {_calls[name]:,} | {_spent[name]:.3f} |")
    print(f"\nverification: {spent:.2f} s of {total:.1f} s = {100 * spent / total:.2f} % (target: at most 5 %)")
    return 0 if spent / total <= 0.05 else 1


if __name__ == "__main__":
    raise SystemExit(main())
