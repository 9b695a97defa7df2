"""The label audit's folds one after another in the task (all its threads) against side by side in
processes (one thread each), measured alternately in one run on the same prepared data (issue 19,
acceptance 3).

The shared faces are ingested, split and preprocessed once into a scratch storage; then the pipeline's own
audit (`pipeline.label_audit`, the `cpu` profile's CNN folds) runs in rounds, each round once in each mode
(in-process first in odd rounds, workers first in even ones), every time from scratch (its stored folds and
result deleted). Every timing includes what the mode costs a real run: the workers' start and their first,
slow training steps. It prints each audit's seconds, the ratio per round and the mean ratio, and checks that
the two modes rank the images alike (they differ in thread count, so not bit for bit).

    .venv/bin/python bench/audit_workers_bench.py                       # 4 folds, 2 rounds
    .venv/bin/python bench/audit_workers_bench.py --folds 10 --rounds 1 --source ../shared/data/generated_photos
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", default=str(REPO.parent / "shared" / "data" / "generated_photos"))
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import pandas as pd

    from gender_tasks import layout, pipeline
    from gender_tasks.data.shards import CACHE_DIR_ENV
    from gender_tasks.storage import open_storage
    from gender_tasks.training import label_audit as audit_mod
    from gender_tasks.training.devices import configure_threads

    work = Path(tempfile.mkdtemp(prefix="audit-workers-"))
    try:
        os.environ[CACHE_DIR_ENV] = str(work / "local-cache")
        conf = {"source": args.source, "storage": str(work / "store"), "profile": "cpu", "models": ["cnn"],
                "label_audit_folds": args.folds}  # fmt: skip
        run = pipeline.prepare(conf, run_id="audit-workers")
        for step in (pipeline.ingest, pipeline.split, pipeline.preprocess):
            run = step(run)
        storage = open_storage(str(work / "store"))
        audits = f"{layout.dataset_prefix(run['dataset']['dataset_id'])}/label_audit/"
        in_task_min = audit_mod.PARALLEL_MIN_IMAGES

        def audit(mode: str, key: str) -> tuple[float, pd.DataFrame]:
            for stored in storage.list(audits):
                storage.delete(stored)
            audit_mod.PARALLEL_MIN_IMAGES = 10**12 if mode == "in-task" else in_task_min
            started = time.perf_counter()
            summary = pipeline.label_audit({**run, "run_key": key})
            seconds = time.perf_counter() - started
            assert summary["reused"] is False
            return seconds, pd.read_csv(io.BytesIO(storage.get_bytes(layout.label_audit_key(key))))

        cores = audit_mod.usable_cores()
        in_task_threads = configure_threads(1)  # what the audit's in-task loop uses
        print(f"{args.source}: {args.folds} folds of the cnn, {cores} cores; in-task: {in_task_threads} thread(s); "
              f"workers: {audit_mod.fold_threads()} thread(s) each", flush=True)  # fmt: skip
        ratios = []
        for r in range(args.rounds):
            order = ("in-task", "workers") if r % 2 == 0 else ("workers", "in-task")
            seconds, tables = {}, {}
            for mode in order:
                seconds[mode], tables[mode] = audit(mode, f"{mode}-{r}")
                print(f"round {r + 1}: {mode:8s} {seconds[mode]:7.1f} s", flush=True)
            ratio = seconds["in-task"] / seconds["workers"]
            ratios.append(ratio)
            a, b = (tables[m].set_index("key") for m in ("in-task", "workers"))
            b = b.loc[a.index]
            agree = ((a["prob_male"] >= 0.5) == (b["prob_male"] >= 0.5)).mean()
            top = len(set(a.index[:50]) & set(b.index[:50]))
            print(f"round {r + 1}: in-task / workers = {ratio:.2f}x; out-of-fold accuracy "
                  f"{((a['prob_male'] >= 0.5) == (a['label'] == 'male')).mean():.3f} vs "
                  f"{((b['prob_male'] >= 0.5) == (b['label'] == 'male')).mean():.3f}; same side of 0.5 for "
                  f"{agree:.3f} of the images; top 50 share {top}", flush=True)  # fmt: skip
        print(f"mean ratio over {len(ratios)} round(s): {sum(ratios) / len(ratios):.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
