"""The pipeline's steps as plain functions: JSON-safe dicts in, JSON-safe dicts out.

Each Airflow task is one call to one of these, so the whole pipeline runs and is tested without
Airflow. Data moves through object storage; only URIs, keys and small summaries are returned.

One small **run record** travels from step to step: `prepare` makes it (the run's id and storage
folder, where its report will be, the resolved settings), and each data step returns it with its own
summary added under one name (`dataset`, `split`, `validation`, `caches`). The fan-out steps (train,
label_audit, evaluate_external) take the record and return only their own result, which `report`
gathers. So every task has one input edge, and the record, saved as `prepare`'s XCom, tells the UI
plugin where a run's report is whatever storage the run used.

Every step from ingest to report holds leases (leases.py) while it runs, on the run and on its
dataset: `gc` removes nothing of a run or a dataset in use, whatever its age.

The DAG file imports this module when Airflow parses it, so importing it stays cheap: each step imports
what it needs (pandas, torch, Great Expectations, boto3, PIL) when it runs, never at module level.
"""

from __future__ import annotations

import functools
import logging
import shutil
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from . import layout, tracking
from .leases import hold_lease, holder_name
from .settings import as_settings, resolve_settings
from .storage import open_storage, recorded_sha256

log = logging.getLogger(__name__)


def _timed(fn):
    """Add the step's wall time (`seconds`) to the dict it returns, for the report's metadata."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        started = time.monotonic()
        out = fn(*args, **kwargs)
        out["seconds"] = round(time.monotonic() - started, 2)
        return out

    return wrapper


def _leased(step: str):
    """While the step runs it holds a lease on its run and, once the run has one, on its dataset: `gc`
    leaves both alone (the step's objects, and what it reads: the split, the cache, keyed models)."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(run: dict, *args, **kwargs):
            storage = open_storage(run["settings"]["storage"])
            owner = f"{step} of run {run['run_key']}"
            with ExitStack() as stack:
                stack.enter_context(hold_lease(storage, layout.run_lease_key(run["run_key"], holder_name(step)),
                                               owner=owner))  # fmt: skip
                if "dataset" in run:
                    key = layout.dataset_lease_key(run["dataset"]["dataset_id"], holder_name(step))
                    stack.enter_context(hold_lease(storage, key, owner=owner))
                return fn(run, *args, **kwargs)

        return wrapper

    return decorate


def _adds(name: str):
    """The step returns its summary (timed); its caller gets the run record with the summary under `name`."""

    def decorate(fn):
        timed = _timed(fn)

        @functools.wraps(fn)
        def wrapper(run: dict, *args, **kwargs) -> dict:
            return {**run, name: timed(run, *args, **kwargs)}

        return wrapper

    return decorate


def prepare(conf: dict, run_id: str = "local") -> dict:
    """The run record every later step receives: the resolved settings and where the run's outputs go."""
    from .data.filters import split_spec

    settings = resolve_settings(conf)
    for spec in settings.external_eval:
        split_spec(spec)  # a malformed filter fails the run here, not after training (reads no folder)
    # The default storage is resolved once, here, so that every task (and the UI plugin) uses the same.
    settings = settings.replace(storage=open_storage(settings.storage).uri)
    run_key = layout.run_key_for(run_id)
    return {"run_id": run_id, "run_key": run_key, "storage": settings.storage,
            "report_key": layout.report_key(run_key), "settings": settings.to_dict()}  # fmt: skip


@_leased("ingest")
@_adds("dataset")
def ingest(run: dict) -> dict:
    from .data.attributes import load_labels, store_attributes
    from .data.ingest import Limits, ingest_folder
    from .data.manifest import read_manifest, write_manifest
    from .data.sources import resolve_source

    settings = as_settings(run["settings"])
    storage = open_storage(settings.storage)
    workdir = Path(tempfile.mkdtemp(prefix="gender-ingest-"))
    try:
        root = resolve_source(settings.source, workdir, max_bytes=settings.max_source_bytes)
        labels = load_labels(root)  # a broken labels.csv is refused before anything is written
        summary = ingest_folder(root, storage, Limits.of(settings))
        key = layout.manifest_key(summary["dataset_id"])
        manifest = read_manifest(storage, key, dataset_id=summary["dataset_id"])
        # Every later step reads the manifest it checked here: the run record holds its checksum.
        summary["manifest_sha256"] = recorded_sha256(storage, key) or write_manifest(storage, key, manifest)
        summary["attributes"] = store_attributes(labels, root, storage, summary["dataset_id"], manifest)
        return summary
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@_leased("split")
@_adds("split")
def split(run: dict) -> dict:
    """One split per repeat (seed + r); the top-level split_key / counts are repeat 0's."""
    settings, dataset = as_settings(run["settings"]), run["dataset"]
    storage = open_storage(settings.storage)
    repeats = [_split_one(storage, settings.for_repeat(r), dataset) | {"repeat": r} for r in range(settings.repeats)]
    return {"split_key": repeats[0]["split_key"], "split_sha256": repeats[0]["split_sha256"],
            "counts": repeats[0]["counts"], "repeats": repeats}  # fmt: skip


def _split_one(storage, settings, dataset: dict) -> dict:
    from .data.images import DECODE_VERSION
    from .data.manifest import read_manifest, write_manifest
    from .data.split import assign_splits, split_counts

    dataset_id = dataset["dataset_id"]
    distance = int(settings.split_group_distance)
    key = layout.split_key(dataset_id, settings.seed, list(settings.split), distance, decode=DECODE_VERSION)
    if storage.exists(key):
        manifest = read_manifest(storage, key, dataset_id=dataset_id)
        sha = recorded_sha256(storage, key) or write_manifest(storage, key, manifest)
    else:
        source = read_manifest(storage, layout.manifest_key(dataset_id), dataset.get("manifest_sha256"),
                               dataset_id=dataset_id)  # fmt: skip
        manifest = assign_splits(source, settings.seed, list(settings.split), distance)
        sha = write_manifest(storage, key, manifest)
    counts = split_counts(manifest)
    log.info("split %s (seed %d): %s", dataset_id, settings.seed, counts)
    return {"split_key": key, "split_sha256": sha, "counts": counts, "seed": settings.seed}


def _repeat_split(split_info: dict, repeat: int) -> dict:
    return split_info.get("repeats", [split_info])[int(repeat)]


def repeat_split_key(split_info: dict, repeat: int) -> str:
    """The split of repeat `repeat` (split_info from `split`)."""
    return _repeat_split(split_info, repeat)["split_key"]


def read_split(storage, run: dict, repeat: int = 0):
    """Repeat `repeat`'s split manifest, checked against the checksum in the run record (and the dataset id)."""
    from .data.manifest import read_manifest

    info = _repeat_split(run["split"], repeat)
    return read_manifest(storage, info["split_key"], info.get("split_sha256"), dataset_id=run["dataset"]["dataset_id"])


@_leased("validate")
@_adds("validation")
def validate(run: dict) -> dict:
    """The data expectations (Great Expectations), then near-duplicates across splits (phash)."""
    from .data.near_duplicates import check_near_duplicates
    from .data.validate import validate_manifest

    settings, split_info = as_settings(run["settings"]), run["split"]
    storage = open_storage(settings.storage)
    summaries = []
    for r in range(len(split_info.get("repeats", [split_info]))):  # every repeat's split: each must hold
        manifest = read_split(storage, run, r)
        summary = validate_manifest(manifest, settings)
        summary.update(check_near_duplicates(manifest, settings.near_duplicate_distance,
                                             settings.near_duplicates_fatal))  # fmt: skip
        summaries.append(summary)
    # The report shows repeat 0's checks in detail, and whether every repeat's passed.
    return summaries[0] | {"repeats_success": [bool(s.get("success")) for s in summaries]}


@_leased("preprocess")
@_adds("caches")
def preprocess(run: dict) -> dict:
    from .data.preprocess import build_cache

    settings, dataset = as_settings(run["settings"]), run["dataset"]
    storage = open_storage(settings.storage)
    manifest = read_split(storage, run)
    sizes = {spec.image_size for spec in settings.per_model.values()}
    if settings.label_audit:
        sizes.add(settings.label_audit_spec.image_size)
    sizes = sorted(sizes)
    return {"cache_prefixes": [build_cache(storage, manifest, dataset["dataset_id"], size) for size in sizes]}


@_leased("train")
@_timed
def train(run: dict, model_name: str, parallel_tasks: int = 1, repeat: int = 0) -> dict:
    """Train one model of one repeat: its own split and seed (seed + repeat), its own storage folder."""
    from .training.trainer import train_model

    settings, dataset, run_key = as_settings(run["settings"]), run["dataset"], run["run_key"]
    settings = settings.for_repeat(repeat)
    storage = open_storage(settings.storage)
    manifest = read_split(storage, run, repeat)
    out = train_model(
        storage, run_key=layout.repeat_run_key(run_key, repeat), model_name=model_name, manifest=manifest,
        dataset_id=dataset["dataset_id"], settings=settings, parallel_tasks=parallel_tasks,
    )  # fmt: skip
    return out | {"repeat": int(repeat)}


@_leased("ensemble")
@_timed
def ensemble(run: dict) -> dict:
    """The ensemble (mean P(male)) of every repeat's trained models, exported beside them; a run of one
    model makes none and returns why (`skipped`), as the DAG, which skips the task then, records it."""
    from .training.ensemble import build_ensemble

    if (reason := skip_reason(run, "ensemble")) is not None:
        return {"skipped": reason}
    settings, run_key = as_settings(run["settings"]), run["run_key"]
    storage = open_storage(settings.storage)
    return {"repeats": [build_ensemble(storage, run_key=layout.repeat_run_key(run_key, r),
                                       settings=settings.for_repeat(r)) for r in range(settings.repeats)]}  # fmt: skip


def skip_reason(run: dict, step: str) -> str | None:
    """Why this run's settings leave `step` out, or None where it runs. The DAG then ends the step's task
    as skipped and leaves this reason as its result, for the report.

    `label_audit` and `evaluate_external` are switched on or off; `ensemble` needs two or more models."""
    settings = run["settings"]
    if step == "ensemble":
        models = list(settings["models"])
        if len(models) >= 2:
            return None
        return f"an ensemble needs at least two models; this run trains only {', '.join(models) or 'none'}"
    off = {"label_audit": not settings["label_audit"], "evaluate_external": not settings["external_eval"]}[step]
    return f"{step} is switched off in this run's settings" if off else None


def is_switched_off(run: dict, step: str) -> bool:
    """Whether this run's settings leave `step` out (skip_reason says why)."""
    return skip_reason(run, step) is not None


@_leased("label_audit")
@_timed
def label_audit(run: dict, parallel_tasks: int = 1) -> dict:
    from .training.label_audit import run_label_audit

    settings, dataset, run_key = as_settings(run["settings"]), run["dataset"], run["run_key"]
    if not settings.label_audit:
        return {"skipped": "label_audit is off in the settings"}
    storage = open_storage(settings.storage)
    manifest = read_split(storage, run)
    return run_label_audit(storage, run_key=run_key, manifest=manifest, dataset_id=dataset["dataset_id"],
                           settings=settings, parallel_tasks=parallel_tasks)  # fmt: skip


@_leased("evaluate_external")
@_timed
def evaluate_external(run: dict) -> dict:
    from .evaluation.external import evaluate_external as evaluate

    settings, run_key = as_settings(run["settings"]), run["run_key"]
    storage = open_storage(settings.storage)
    return {"sets": [evaluate(storage, run_key=run_key, settings=settings, spec=spec)["name"]
                     for spec in settings.external_eval]}  # fmt: skip


def task_durations(run: dict, trained: list[dict], label_audit: dict | None, external: dict | None,
                   ensembled: dict | None = None) -> dict:  # fmt: skip
    """Wall time per step that ran; a skipped step (None, or switched off) is not listed."""
    durations = {step: run[key]["seconds"] for step, key in
                 (("ingest", "dataset"), ("split", "split"), ("validate", "validation"), ("preprocess", "caches"))
                 if key in run}  # fmt: skip
    durations |= {f"train {t['model']}" + (f" #{t['repeat']}" if t.get("repeat") else ""): t["seconds"]
                  for t in trained}  # fmt: skip
    if ensembled and "skipped" not in ensembled:
        durations["ensemble"] = ensembled["seconds"]
    if label_audit and "skipped" not in label_audit:
        durations["label audit"] = label_audit["seconds"]
    if external and external.get("sets"):
        durations["external evaluation"] = external["seconds"]
    return durations


@_leased("report")
@_timed
def report(run: dict, trained: list[dict] | None = None, label_audit: dict | None = None,
           external: dict | None = None, ensembled: dict | None = None) -> dict:  # fmt: skip
    from .reporting.report import build_report

    settings, dataset, split_info, validation = (as_settings(run["settings"]), run["dataset"], run["split"],
                                                 run["validation"])  # fmt: skip
    storage = open_storage(settings.storage)
    durations = task_durations(run, trained or [], label_audit, external, ensembled)
    out = build_report(
        storage, run_key=run["run_key"], settings=settings, dataset=dataset, validation=validation,
        split_key=split_info["split_key"], task_durations=durations, run_id=run["run_id"], label_audit=label_audit,
        repeat_split_keys=[repeat_split_key(split_info, r) for r in range(settings.repeats)],
        ensemble_skipped=(ensembled or {}).get("skipped"),
    )  # fmt: skip
    if tracking.enabled():  # opt-in (MLFLOW_TRACKING_URI): only then is mlflow imported
        out["mlflow"] = tracking.log_run(storage, run_key=run["run_key"], settings=settings)
    return out
