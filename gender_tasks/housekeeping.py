"""Garbage collection of object storage (`python -m gender_tasks gc`).

Removes runs older than the retention, then every object that no manifest and no kept run references:

- images of ingests that never committed their manifest, and what is left of a deleted dataset
  (its manifest gone: splits, caches, attributes);
- keyed models and label audits (layout.trained_prefix, audit_result_key) that no kept run copied;
- leftover checkpoints: of a model that was exported, of a training nobody resumed within the
  retention, and the run-folder checkpoints of earlier versions;
- leases abandoned by a holder that died (killed with kill -9) without removing them;
- scorings of new images (scoring/<score_key>/) older than the retention, and scored batches
  (scoring/parts/) older than the retention and than GENDER_GC_UNFINISHED_HOURS: a part only lets a
  killed scoring resume, or a scoring of the same images rebuild its predictions without scoring again.

It never removes work in progress, whatever the retention says. Ages cannot tell it (an ingest can
upload for hours, `--keep-days 0` makes every run old), so work in progress holds leases (leases.py):

- a run or a dataset with a fresh lease is left alone, all of it: every step of a run holds one on
  the run and on its dataset while it runs, an ingest one on its dataset while it uploads;
- a run that has not finished (no results.json) is kept until nothing of it was written for
  GENDER_GC_UNFINISHED_HOURS (24): between two steps, or queued for a GPU, it holds no lease;
- nothing of a dataset younger than an hour goes, lease or not (GRACE_S);
- the leases are looked at again just before removing, and every RECHECK_EVERY removals: work that
  starts on a run or a dataset while `gc` runs stops its removal there;
- a scoring in progress leases scoring/ (nothing under it is removed while it holds the lease) and the
  run whose model it scores with (kept, however old).

A lease not renewed for GENDER_LEASE_EXPIRY_S (15 minutes) is abandoned: it protects nothing and goes.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from . import layout
from .environment import get_number, variable
from .errors import PermanentError
from .leases import describe_holder, expiry_seconds, is_fresh
from .storage import ObjectInfo, Storage

log = logging.getLogger(__name__)

DAY_S = 86_400
GRACE_S = 3_600  # objects this young may belong to an ingest or a training in progress
RUN_RECORDS = ("results.json", layout.TRAINED_RECORD, "model_card.json", "label_audit.json")
UNFINISHED_VAR = "GENDER_GC_UNFINISHED_HOURS"
DEFAULT_UNFINISHED_H = variable(UNFINISHED_VAR).default  # 24 h
RECHECK_EVERY = 100  # removals between two looks at the leases of the run or dataset being cleaned


class HousekeepingConfigError(PermanentError):
    """A gc setting in the environment is not usable; the message names it and a value that works."""


def unfinished_run_seconds() -> float:
    """How long a run without results.json is kept after its last write, whatever the retention."""
    hours = get_number(UNFINISHED_VAR, error=HousekeepingConfigError)
    return hours * 3_600


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
    """Find (and unless `dry_run`, delete) what the module docstring lists; returns what was (or would be) removed.

    `now` (seconds since the epoch) is the time `gc` takes it to be, for tests; it runs on from there.
    """
    started = time.time()
    now = started if now is None else now
    expiry, unfinished_s = expiry_seconds(), unfinished_run_seconds()
    objects = storage.list_info("")
    runs: dict[str, list[ObjectInfo]] = defaultdict(list)
    datasets: dict[str, list[ObjectInfo]] = defaultdict(list)
    scorings: list[ObjectInfo] = []
    for obj in objects:
        kind, owner, _ = layout.describe_key(obj.key)
        if kind == "run":
            runs[owner].append(obj)
        elif kind != "other":
            datasets[owner].append(obj)
        elif layout.describe_scoring_key(obj.key) is not None:
            scorings.append(obj)
    removals = _expired_runs(runs, keep_days, now, expiry, unfinished_s)
    expired = {layout.describe_key(r.key)[1] for r in removals}
    kept = {k: objs for k, objs in runs.items() if k not in expired}
    removals += _run_checkpoints(kept)
    # A finished run's abandoned leases go; an unfinished run's stay its last sign of life, and go with it.
    removals += [_abandoned(storage, o, now) for run_key, objs in kept.items() if _finished(run_key, objs)
                 for o in objs if layout.is_lease_key(o.key) and not is_fresh(o, now, expiry)]  # fmt: skip
    refs = _references(storage, kept)
    for dataset_id, objs in datasets.items():
        if _has_fresh_lease(objs, now, expiry):
            log.info("dataset %s: work in progress holds a lease on it, nothing of it is removed", dataset_id)
            continue
        removals += _dataset_garbage(storage, dataset_id, objs, refs, keep_days, now)
    removals += _scoring_garbage(storage, scorings, keep_days, now, expiry, unfinished_s)
    if dry_run:
        return removals
    removed = _delete(storage, removals, lambda: now + time.time() - started, expiry)
    sweep = getattr(storage, "remove_empty_folders", None)  # a local folder's; a bucket has no folders
    if sweep is not None and (folders := sweep()):
        log.info("removed %d empty folder(s)", folders)
    return removed


def _has_fresh_lease(objs: list[ObjectInfo], now: float, expiry: float) -> bool:
    return any(layout.is_lease_key(o.key) and is_fresh(o, now, expiry) for o in objs)


def _abandoned(storage: Storage, lease: ObjectInfo, now: float) -> Removal:
    minutes = (now - lease.modified) / 60
    holder = describe_holder(storage, lease.key)
    return Removal(lease.key, lease.size, f"lease abandoned by {holder}: not renewed for {minutes:.0f} minutes")


def _expired_runs(runs: dict[str, list[ObjectInfo]], keep_days: float, now: float, expiry: float,
                  unfinished_s: float) -> list[Removal]:  # fmt: skip
    """Every object of a run whose newest object is older than the retention, unless the run is in
    progress: a step holds a fresh lease on it, or it has no results.json and wrote within `unfinished_s`."""
    out = []
    for run_key, objs in sorted(runs.items()):
        if _has_fresh_lease(objs, now, expiry):
            log.info("run %s: a step of it holds a lease, nothing of it is removed", run_key)
            continue
        age_s = now - max(o.modified for o in objs)
        finished = _finished(run_key, objs)
        if not finished and age_s < unfinished_s:
            log.info("run %s has not finished (no results.json) and wrote %.1f hours ago: kept", run_key, age_s / 3600)
            continue
        if age_s / DAY_S > keep_days:
            state = "" if finished else "unfinished (no results.json) and "
            reason = f"run {run_key} is {state}{age_s / DAY_S:.0f} days old (keeping {keep_days:g})"
            out += [Removal(o.key, o.size, reason) for o in objs]
    return out


def _finished(run_key: str, objs: list[ObjectInfo]) -> bool:
    """Whether the run's report step wrote results.json (its last write)."""
    return any(o.key == layout.results_key(run_key) for o in objs)


def _lease_prefix(key: str) -> str | None:
    """The leases folder of the run, dataset or scorings `key` belongs to (None: it belongs to none)."""
    parts = key.split("/")
    if parts[0] in (layout.RUNS, layout.DATASETS) and len(parts) >= 3:
        return f"{parts[0]}/{parts[1]}/{layout.LEASES}/"
    if parts[0] == layout.SCORING:
        return f"{layout.SCORING}/{layout.LEASES}/"
    return None


def _scoring_garbage(storage: Storage, objs: list[ObjectInfo], keep_days: float, now: float, expiry: float,
                     unfinished_s: float) -> list[Removal]:  # fmt: skip
    """Scorings (scoring/<score_key>/, all of one together) whose newest object is older than the retention,
    an unfinished one (no summary.json) not before nothing of it was written for `unfinished_s`; scored batches
    (a part and its checksum record together) older than the retention and than `unfinished_s`. Nothing while
    a scoring holds a fresh lease; abandoned leases go. A scoring's summary.json goes first, and each object
    before its checksum record: a `gc` stopped half-way leaves a scoring that is scored again and records without
    their objects (read as missing objects), never a scoring taken as done or an object that cannot be checked."""
    if _has_fresh_lease(objs, now, expiry):
        log.info("scoring/: a scoring in progress holds a lease, nothing of it is removed")
        return []
    out = [_abandoned(storage, o, now) for o in objs if layout.is_lease_key(o.key)]
    groups: dict[tuple[str, str], list[ObjectInfo]] = defaultdict(list)
    for obj in objs:
        kind, owner = layout.describe_scoring_key(obj.key) or ("", "")
        if kind == "scoring":
            groups[kind, owner].append(obj)
        elif kind == "part":
            groups[kind, obj.key.removesuffix(layout.CHECKSUM_SUFFIX)].append(obj)
    for (kind, owner), group in sorted(groups.items()):
        age_s = now - max(o.modified for o in group)
        days = f"{age_s / DAY_S:.0f} days old (keeping {keep_days:g})"
        if kind == "part":
            if age_s < unfinished_s or age_s / DAY_S <= keep_days:
                continue
            reason = f"scored batch {days}: only a killed scoring of its images would resume from it"
        else:
            finished = any(o.key == f"{layout.score_prefix(owner)}/{layout.SCORING_SUMMARY}" for o in group)
            if (not finished and age_s < unfinished_s) or age_s / DAY_S <= keep_days:
                continue
            reason = f"scoring {owner} is {'' if finished else 'unfinished (no summary.json) and '}{days}"
        # summary.json first (a scoring without it is scored again, not taken as done), then objects, then records
        group = sorted(group, key=lambda o: (not o.key.endswith("/" + layout.SCORING_SUMMARY),
                                             o.key.endswith(layout.CHECKSUM_SUFFIX), o.key))  # fmt: skip
        out += [Removal(o.key, o.size, reason) for o in group]
    return out


def _delete(storage: Storage, removals: list[Removal], clock: Callable[[], float], expiry: float) -> list[Removal]:
    """Delete, run by run and dataset by dataset, looking at their leases again first and every
    RECHECK_EVERY removals: work that started since the listing keeps what is left. Returns what went."""
    groups: dict[str | None, list[Removal]] = defaultdict(list)
    for removal in removals:
        groups[_lease_prefix(removal.key)].append(removal)
    done = []
    for prefix, group in groups.items():
        for i, removal in enumerate(group):
            if prefix and i % RECHECK_EVERY == 0 and _has_fresh_lease(storage.list_info(prefix), clock(), expiry):
                log.warning("%s is in use since gc listed it (a fresh lease): %d object(s) of it left in place",
                            prefix.removesuffix(f"/{layout.LEASES}/"), len(group) - i)  # fmt: skip
                break
            storage.delete(removal.key)
            done.append(removal)
    return done


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
        if layout.is_lease_key(obj.key):  # none is fresh: the caller leaves a dataset with a fresh lease alone
            out.append(_abandoned(storage, obj, now))
            continue
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
