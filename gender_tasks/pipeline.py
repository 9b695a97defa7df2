"""The pipeline's steps as plain functions: JSON-safe dicts in, JSON-safe dicts out.

Each Airflow task is one call to one of these, so the whole pipeline runs and is tested without
Airflow. Data moves through object storage; only URIs, keys and small summaries are returned.
"""

from __future__ import annotations

import functools
import logging
import re
import shutil
import tempfile
import time
from pathlib import Path

from . import ingest as ingest_mod
from .config import resolve_settings
from .split import assign_splits, split_counts, split_key
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


def run_key_for(run_id: str) -> str:
    """A storage-safe folder name for an Airflow run id (which holds ':' and '+')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", run_id).strip("_") or "run"


def prepare(conf: dict) -> dict:
    settings = resolve_settings(conf)
    settings["storage"] = open_storage(settings["storage"]).uri  # resolve the default once, for every task
    return settings


@_timed
def ingest(settings: dict) -> dict:
    from .attributes import store_attributes
    from .sources import resolve_source

    storage = open_storage(settings["storage"])
    workdir = Path(tempfile.mkdtemp(prefix="gender-ingest-"))
    try:
        root = resolve_source(settings["source"], workdir)
        summary = ingest_mod.ingest_folder(root, storage, max_pixels=settings["max_image_pixels"])
        manifest = ingest_mod.read_manifest(storage, ingest_mod.manifest_key(summary["dataset_id"]))
        summary["attributes"] = store_attributes(root, storage, summary["dataset_id"], manifest)
        return summary
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@_timed
def split(settings: dict, dataset: dict) -> dict:
    storage = open_storage(settings["storage"])
    dataset_id = dataset["dataset_id"]
    distance = int(settings["split_group_distance"])
    key = split_key(dataset_id, settings["seed"], settings["split"], distance)
    if storage.exists(key):
        manifest = ingest_mod.read_manifest(storage, key)
    else:
        source = ingest_mod.read_manifest(storage, ingest_mod.manifest_key(dataset_id))
        if distance >= 0 and "phash" not in source.columns:  # a dataset ingested before phash existed
            from .near_duplicates import with_phash

            source = with_phash(source, storage.get_bytes)
        manifest = assign_splits(source, settings["seed"], settings["split"], distance)
        storage.put_bytes(key, manifest.to_csv(index=False).encode())
    counts = split_counts(manifest)
    log.info("split %s: %s", dataset_id, counts)
    return {"split_key": key, "counts": counts}


@_timed
def validate(settings: dict, split_info: dict) -> dict:
    """The data expectations (Great Expectations), then near-duplicates across splits (phash)."""
    from .near_duplicates import check_near_duplicates
    from .validate import validate_manifest

    storage = open_storage(settings["storage"])
    manifest = ingest_mod.read_manifest(storage, split_info["split_key"])
    summary = validate_manifest(manifest, settings)
    # Manifests from before the phash column get their hashes from the stored images.
    summary.update(check_near_duplicates(manifest, settings, storage.get_bytes))
    return summary


@_timed
def preprocess(settings: dict, dataset: dict, split_info: dict) -> dict:
    from .preprocess import build_cache

    storage = open_storage(settings["storage"])
    manifest = ingest_mod.read_manifest(storage, split_info["split_key"])
    sizes = {spec["image_size"] for spec in settings["per_model"].values()}
    if settings["label_audit"]:
        sizes.add(settings["label_audit_spec"]["image_size"])
    sizes = sorted(sizes)
    return {"cache_keys": [build_cache(storage, manifest, dataset["dataset_id"], size) for size in sizes]}


@_timed
def train(settings: dict, dataset: dict, split_info: dict, model_name: str, run_key: str,
          parallel_tasks: int = 1) -> dict:  # fmt: skip
    from .train import train_model

    storage = open_storage(settings["storage"])
    manifest = ingest_mod.read_manifest(storage, split_info["split_key"])
    return train_model(
        storage, run_key=run_key, model_name=model_name, manifest=manifest,
        dataset_id=dataset["dataset_id"], settings=settings, parallel_tasks=parallel_tasks,
    )  # fmt: skip


@_timed
def label_audit(settings: dict, dataset: dict, split_info: dict, run_key: str, parallel_tasks: int = 1) -> dict:
    from .label_audit import run_label_audit

    if not settings["label_audit"]:
        return {"skipped": "label_audit is off in the settings"}
    storage = open_storage(settings["storage"])
    manifest = ingest_mod.read_manifest(storage, split_info["split_key"])
    return run_label_audit(storage, run_key=run_key, manifest=manifest, dataset_id=dataset["dataset_id"],
                           settings=settings, parallel_tasks=parallel_tasks)  # fmt: skip


@_timed
def evaluate_external(settings: dict, run_key: str) -> dict:
    from .external import evaluate_external as evaluate

    storage = open_storage(settings["storage"])
    return {"sets": [evaluate(storage, run_key=run_key, settings=settings, spec=spec)["name"]
                     for spec in settings["external_eval"]]}  # fmt: skip


@_timed
def report(settings: dict, dataset: dict, split_info: dict, validation: dict, run_key: str,
           run_id: str | None = None, task_durations: dict | None = None, label_audit: dict | None = None,
           ) -> dict:  # fmt: skip
    from .report import build_report

    storage = open_storage(settings["storage"])
    return build_report(
        storage, run_key=run_key, settings=settings, dataset=dataset, validation=validation,
        split_key=split_info["split_key"], task_durations=task_durations, run_id=run_id, label_audit=label_audit,
    )  # fmt: skip
