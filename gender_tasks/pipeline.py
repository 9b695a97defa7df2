"""The pipeline's steps as plain functions: JSON-safe dicts in, JSON-safe dicts out.

Each Airflow task is one call to one of these, so the whole pipeline runs and is tested without
Airflow. Data moves through object storage; only URIs, keys and small summaries are returned.
"""

from __future__ import annotations

import functools
import logging
import shutil
import tempfile
import time
from pathlib import Path

from . import layout
from .data.manifest import read_manifest, write_manifest
from .settings import as_settings, resolve_settings
from .storage import open_storage

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


def prepare(conf: dict) -> dict:
    """The run's resolved settings, as the JSON every later step receives."""
    settings = resolve_settings(conf)
    # The default storage is resolved once, here, so that every task uses the same.
    return settings.replace(storage=open_storage(settings.storage).uri).to_dict()


@_timed
def ingest(settings: dict) -> dict:
    from .data.attributes import load_labels, store_attributes
    from .data.ingest import Limits, ingest_folder
    from .data.sources import resolve_source

    settings = as_settings(settings)
    storage = open_storage(settings.storage)
    workdir = Path(tempfile.mkdtemp(prefix="gender-ingest-"))
    try:
        root = resolve_source(settings.source, workdir, max_bytes=settings.max_source_bytes)
        labels = load_labels(root)  # a broken labels.csv is refused before anything is written
        summary = ingest_folder(root, storage, Limits.of(settings))
        manifest = read_manifest(storage, layout.manifest_key(summary["dataset_id"]))
        summary["attributes"] = store_attributes(labels, root, storage, summary["dataset_id"], manifest)
        return summary
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@_timed
def split(settings: dict, dataset: dict) -> dict:
    from .data.split import assign_splits, split_counts

    settings = as_settings(settings)
    storage = open_storage(settings.storage)
    dataset_id = dataset["dataset_id"]
    distance = int(settings.split_group_distance)
    key = layout.split_key(dataset_id, settings.seed, list(settings.split), distance)
    if storage.exists(key):
        manifest = read_manifest(storage, key)
    else:
        source = read_manifest(storage, layout.manifest_key(dataset_id))
        manifest = assign_splits(source, settings.seed, list(settings.split), distance)
        write_manifest(storage, key, manifest)
    counts = split_counts(manifest)
    log.info("split %s: %s", dataset_id, counts)
    return {"split_key": key, "counts": counts}


@_timed
def validate(settings: dict, split_info: dict) -> dict:
    """The data expectations (Great Expectations), then near-duplicates across splits (phash)."""
    from .data.near_duplicates import check_near_duplicates
    from .data.validate import validate_manifest

    settings = as_settings(settings)
    storage = open_storage(settings.storage)
    manifest = read_manifest(storage, split_info["split_key"])
    summary = validate_manifest(manifest, settings)
    summary.update(check_near_duplicates(manifest, settings.near_duplicate_distance, settings.near_duplicates_fatal))
    return summary


@_timed
def preprocess(settings: dict, dataset: dict, split_info: dict) -> dict:
    from .data.preprocess import build_cache

    settings = as_settings(settings)
    storage = open_storage(settings.storage)
    manifest = read_manifest(storage, split_info["split_key"])
    sizes = {spec.image_size for spec in settings.per_model.values()}
    if settings.label_audit:
        sizes.add(settings.label_audit_spec.image_size)
    sizes = sorted(sizes)
    return {"cache_prefixes": [build_cache(storage, manifest, dataset["dataset_id"], size) for size in sizes]}


@_timed
def train(settings: dict, dataset: dict, split_info: dict, model_name: str, run_key: str,
          parallel_tasks: int = 1) -> dict:  # fmt: skip
    from .training.trainer import train_model

    settings = as_settings(settings)
    storage = open_storage(settings.storage)
    manifest = read_manifest(storage, split_info["split_key"])
    return train_model(
        storage, run_key=run_key, model_name=model_name, manifest=manifest,
        dataset_id=dataset["dataset_id"], settings=settings, parallel_tasks=parallel_tasks,
    )  # fmt: skip


@_timed
def label_audit(settings: dict, dataset: dict, split_info: dict, run_key: str, parallel_tasks: int = 1) -> dict:
    from .training.label_audit import run_label_audit

    settings = as_settings(settings)
    if not settings.label_audit:
        return {"skipped": "label_audit is off in the settings"}
    storage = open_storage(settings.storage)
    manifest = read_manifest(storage, split_info["split_key"])
    return run_label_audit(storage, run_key=run_key, manifest=manifest, dataset_id=dataset["dataset_id"],
                           settings=settings, parallel_tasks=parallel_tasks)  # fmt: skip


@_timed
def evaluate_external(settings: dict, run_key: str) -> dict:
    from .evaluation.external import evaluate_external as evaluate

    settings = as_settings(settings)
    storage = open_storage(settings.storage)
    return {"sets": [evaluate(storage, run_key=run_key, settings=settings, spec=spec)["name"]
                     for spec in settings.external_eval]}  # fmt: skip


@_timed
def report(settings: dict, dataset: dict, split_info: dict, validation: dict, run_key: str,
           run_id: str | None = None, task_durations: dict | None = None, label_audit: dict | None = None,
           ) -> dict:  # fmt: skip
    from .reporting.report import build_report

    settings = as_settings(settings)
    storage = open_storage(settings.storage)
    return build_report(
        storage, run_key=run_key, settings=settings, dataset=dataset, validation=validation,
        split_key=split_info["split_key"], task_durations=task_durations, run_id=run_id, label_audit=label_audit,
    )  # fmt: skip
