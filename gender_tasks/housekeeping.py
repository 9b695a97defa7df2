"""Garbage collection of object storage (`python -m gender_tasks gc`).

Removes runs older than the retention, then every object that no manifest and no kept run references:

- images of ingests that never committed their manifest, and what is left of a deleted dataset
  (its manifest gone: splits, caches, attributes);
- keyed models and label audits (layout.trained_prefix, audit_result_key) that no kept run copied;
- leftover checkpoints: of a model that was exported, of a training nobody resumed within the
  retention, and the run-folder checkpoints of earlier versions.

It never removes anything of a dataset a kept run uses, and never an object younger than an hour
outside expired runs: an ingest or a training may be writing it right now.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass

from . import layout
from .storage import ObjectInfo, Storage

log = logging.getLogger(__name__)

DAY_S = 86_400
GRACE_S = 3_600  # objects this young may belong to an ingest or a training in progress
RUN_RECORDS = ("results.json", layout.TRAINED_RECORD, "model_card.json", "label_audit.json")


@dataclass(frozen=True)
class Removal:
    key: str
    size: int
    reason: str


@dataclass
class _Refs:
    """What the kept runs use."""

    datasets: set[str]
    trained: set[str]  # keyed model prefixes
    audits: set[str]  # keyed audit keys


def collect_garbage(storage: Storage, *, keep_days: float, dry_run: bool = False,
                    now: float | None = None) -> list[Removal]:  # fmt: skip
    """Find (and unless `dry_run`, delete) what the module docstring lists; returns it, largest reason first."""
    now = time.time() if now is None else now
    objects = storage.list_info("")
    runs: dict[str, list[ObjectInfo]] = defaultdict(list)
    datasets: dict[str, list[ObjectInfo]] = defaultdict(list)
    for obj in objects:
        kind, owner, _ = layout.describe_key(obj.key)
        if kind == "run":
            runs[owner].append(obj)
        elif kind != "other":
            datasets[owner].append(obj)
    removals = _expired_runs(runs, keep_days, now)
    expired = {layout.describe_key(r.key)[1] for r in removals}
    kept = {k: objs for k, objs in runs.items() if k not in expired}
    removals += _run_checkpoints(kept)
    refs = _references(storage, kept)
    for dataset_id, objs in datasets.items():
        removals += _dataset_garbage(storage, dataset_id, objs, refs, keep_days, now)
    if not dry_run:
        for removal in removals:
            storage.delete(removal.key)
    return removals


def _expired_runs(runs: dict[str, list[ObjectInfo]], keep_days: float, now: float) -> list[Removal]:
    """Every object of a run whose newest object is older than the retention."""
    out = []
    for run_key, objs in sorted(runs.items()):
        age_days = (now - max(o.modified for o in objs)) / DAY_S
        if age_days > keep_days:
            reason = f"run {run_key} is {age_days:.0f} days old (keeping {keep_days:g})"
            out += [Removal(o.key, o.size, reason) for o in objs]
    return out


def _run_checkpoints(kept: dict[str, list[ObjectInfo]]) -> list[Removal]:
    """Checkpoints in run folders: earlier versions kept them there after the model was exported."""
    return [Removal(o.key, o.size, "checkpoint left in a run folder") for objs in kept.values() for o in objs
            if o.key.endswith("/" + layout.CHECKPOINT)]  # fmt: skip


def _references(storage: Storage, kept: dict[str, list[ObjectInfo]]) -> _Refs:
    refs = _Refs(set(), set(), set())
    for objs in kept.values():
        for obj in objs:
            if obj.key.rpartition("/")[2] not in RUN_RECORDS:
                continue
            try:
                record = json.loads(storage.get_bytes(obj.key))
            except (FileNotFoundError, ValueError):
                continue  # gone since the listing, or not ours: it references nothing
            refs.datasets |= _values_of(record, "dataset_id")
            refs.trained |= _values_of(record, "trained")
            refs.audits |= _values_of(record, "audit")
    return refs


def _values_of(record, name: str) -> set[str]:
    """Every string value of `name` anywhere in a JSON document."""
    found = set()
    if isinstance(record, dict):
        for key, value in record.items():
            if key == name and isinstance(value, str):
                found.add(value)
            else:
                found |= _values_of(value, name)
    elif isinstance(record, list):
        for value in record:
            found |= _values_of(value, name)
    return found


def _manifest_keys(storage: Storage, dataset_id: str) -> set[str] | None:
    """The image keys a dataset's manifest lists; None when it has no manifest (never committed, or deleted)."""
    key = layout.manifest_key(dataset_id)
    try:
        text = storage.get_bytes(key).decode()
    except FileNotFoundError:
        return None
    return {row["key"] for row in csv.DictReader(io.StringIO(text))}


def _dataset_garbage(storage: Storage, dataset_id: str, objs: list[ObjectInfo], refs: _Refs, keep_days: float,
                     now: float) -> list[Removal]:  # fmt: skip
    listed = _manifest_keys(storage, dataset_id)
    used = dataset_id in refs.datasets
    complete = {layout.describe_key(o.key)[2] for o in objs if o.key.endswith("/" + layout.MODEL_OUTPUTS[-1])}
    complete |= {o.key for o in objs if layout.describe_key(o.key)[0] == "audit"}  # finished audits
    out = []
    for obj in objs:
        if now - obj.modified < GRACE_S:
            continue
        reason = _why_garbage(obj, listed, used, refs, complete, (now - obj.modified) / DAY_S > keep_days)
        if reason:
            out.append(Removal(obj.key, obj.size, reason.format(dataset=dataset_id)))
    return out


def _why_garbage(obj: ObjectInfo, listed: set[str] | None, used: bool, refs: _Refs, complete: set[str],
                 past_retention: bool) -> str | None:  # fmt: skip
    """Why one object of a dataset can go, or None to keep it."""
    kind, _, detail = layout.describe_key(obj.key)
    if kind == "checkpoint":
        if detail in complete:
            return "checkpoint of a model that was exported"
        return "checkpoint of a training not resumed within the retention" if past_retention else None
    if kind == "audit_fold":
        if detail in complete:
            return "fold of a label audit that finished"
        return "fold of a label audit not resumed within the retention" if past_retention else None
    if kind == "trained":
        return None if detail in refs.trained else "keyed model no kept run uses"
    if kind == "audit":
        return None if detail in refs.audits else "keyed label audit no kept run uses"
    if used:
        return None  # a kept run's dataset stays whole
    if listed is None:
        return "image of an ingest that never committed" if kind == "image" else "left over from deleted {dataset}"
    if kind == "image" and obj.key not in listed:
        return "image no manifest lists"
    return None


def total_bytes(removals: list[Removal]) -> int:
    return sum(r.size for r in removals)
