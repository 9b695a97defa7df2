"""`python -m gender_tasks verify`: check every stored object against its checksum, like fsck.

Each kind of object has the checksum its writer left:

    datasets/<id>/images/<label>/<sha256>.<ext>   the sha256 in its own key (content addressing)
    datasets/<id>/manifest.csv, splits/*.csv      the sha256 recorded beside it (<key>.sha256), and its rows
                                                  must hash to the dataset id in its key (manifest.check_rows)
    datasets/<id>/cache/<size>px/index.json       the sha256 recorded beside it
    datasets/<id>/cache/<size>px/shard-*.npy      the sha256 in that index
    attributes.csv, label audits and their folds  the sha256 recorded beside each
    models/<model>/.../{predictions.csv, ...}     the sha256 in the model card beside them ("files"), keyed
                                                  models and a run's copies alike
    checkpoint.pt                                 the sha256 in the checkpoint record beside it
    scoring/<key>/predictions.csv, summary.html,  the sha256 recorded beside each (a scoring of new images)
    scoring/parts

An object whose writer recorded no checksum (written by an earlier version) is counted as
unverifiable, not as corrupt. With `repair`, a corrupt object is removed together with the commit
marker that makes the pipeline reuse what it belongs to (a dataset's manifest, a cache's index, a
model's card, a scoring's summary.json), so the next run rebuilds it: ingest uploads the image again from the
source, preprocess rewrites the cache, training trains the model again, scoring the same images with the same
model assembles the predictions again from the stored parts (scoring again the batches whose part went). A
run's own copies are not rebuilt: the run is reported as damaged.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from . import layout
from .data.manifest import check_rows, parse_manifest
from .data.shards import INDEX_NAME
from .integrity import IntegrityError, NotARegularFile, sha256_hex
from .storage import ObjectInfo, Storage, recorded_sha256

log = logging.getLogger(__name__)

WORKERS = 16
MODEL_CARD = layout.MODEL_OUTPUTS[-1]


@dataclass(frozen=True)
class Finding:
    key: str
    problem: str
    # What --repair removes: the object and the commit markers that would make a run reuse it.
    remove: tuple[str, ...]
    rebuilt_by: str


@dataclass
class Report:
    checked: int = 0
    bytes: int = 0
    unverifiable: list[str] = field(default_factory=list)
    corrupt: list[Finding] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _differs(data: bytes, expected: str, where: str) -> str | None:
    """None if `data` hashes to `expected`, else the problem ("sha256 ... is not the ... <where>")."""
    actual = sha256_hex(data)
    return None if actual == expected else f"sha256 {actual[:16]}... is not the {expected[:16]}... {where}"


def _sidecar_checker(storage: Storage, key: str, data: bytes) -> str | None:
    """Problem with an object recorded by storage.put_recorded ('' when unverifiable), or None if it is intact."""
    expected = recorded_sha256(storage, key)
    return "" if expected is None else _differs(data, expected, "recorded beside it")


class _Verifier:
    def __init__(self, storage: Storage):
        self.storage = storage
        self._records: dict[str, dict | None] = {}

    def _json(self, key: str) -> dict | None:
        """A small JSON record (a model card, a cache index), read once; None if missing or unreadable."""
        if key not in self._records:
            try:
                self._records[key] = json.loads(self.storage.get_bytes(key))
            except (FileNotFoundError, ValueError, UnicodeDecodeError):
                self._records[key] = None
        return self._records[key]

    def check(self, key: str) -> tuple[str | None, tuple[str, ...], str, int]:
        """(problem or None, keys to remove on repair, what rebuilds it, bytes read); problem '' = unverifiable.

        A FIFO, device or socket where the object should be (storage.local's NotARegularFile) is never read:
        it is corrupt whatever its kind, removed on repair with what marks its owner reusable."""
        try:
            return self._check(key, self.storage.get_bytes(key))
        except NotARegularFile as exc:
            try:
                _, remove, rebuilt, _ = self._check(key, b"")  # what goes with it, as for bytes that fail their check
            except IntegrityError:  # its checksum record is no plain file either
                remove, rebuilt = (), ""
            return exc.why, tuple(dict.fromkeys((key, *remove))), rebuilt or "the step that writes it, when needed", 0

    def _check(self, key: str, data: bytes) -> tuple[str | None, tuple[str, ...], str, int]:
        storage, name = self.storage, PurePosixPath(key).name
        kind, owner, detail = layout.describe_key(key)
        size = len(data)
        if kind == "image":
            sha = layout.image_sha(key)
            if sha is None:
                return "", (), "", size
            manifest = layout.manifest_key(owner)
            problem = _differs(data, sha, "its key names")
            return problem, (key, manifest, layout.checksum_key(manifest)), "the next ingest of its source", size
        if kind == "manifest" or "/splits/" in key:
            problem = _sidecar_checker(storage, key, data)
            if not problem:  # intact or unrecorded: its rows must still be the dataset's
                try:
                    check_rows(storage, key, parse_manifest(data), owner)
                except IntegrityError as exc:
                    problem = str(exc).split(". ")[0].removeprefix(f"{storage.url(key)} is corrupt: ")
                except (ValueError, KeyError) as exc:  # not a CSV with the manifest's columns
                    problem = f"not a readable manifest ({type(exc).__name__}: {exc})"
            rebuilt = "the next ingest of its source" if kind == "manifest" else "the next run's split step"
            return problem, (key, layout.checksum_key(key)), rebuilt, size
        if "/cache/" in key and name != INDEX_NAME:  # a shard: its sha256 is in the cache's index
            index_key = f"{key.rpartition('/')[0]}/{INDEX_NAME}"
            index = self._json(index_key)
            try:
                number = int(name.removeprefix("shard-").removesuffix(".npy"))
                expected = index["shard_sha256"][number] if index else None
            except (ValueError, IndexError, KeyError, TypeError):
                expected = None
            if expected is None:
                return "", (), "", size
            problem = _differs(data, expected, f"in {index_key}")
            return problem, (key, index_key, layout.checksum_key(index_key)), "the next run's preprocess step", size
        if name == layout.CHECKPOINT:
            record_key = f"{key.rpartition('/')[0]}/{layout.CHECKPOINT_RECORD}"
            record = self._json(record_key)
            if not record or "sha256" not in record:
                return "", (), "", size
            problem = _differs(data, record["sha256"], f"in {layout.CHECKPOINT_RECORD}")
            return problem, (key, record_key), "training from the start", size
        if "/models/" in key and name in (*layout.MODEL_OUTPUTS[:-1], layout.LEGACY_MODEL_FILE):
            folder = key.rpartition("/")[0]
            card = self._json(f"{folder}/{MODEL_CARD}")
            expected = ((card or {}).get("files") or {}).get(name)
            if expected is None:
                return "", (), "", size
            problem = _differs(data, expected, "in its model card")
            if kind == "run":
                return problem, (key,), f"nothing: run {owner} is damaged, rerun it", size
            return problem, (key, f"{folder}/{MODEL_CARD}"), "the next run that trains this model", size
        if recorded := recorded_sha256(storage, key):
            remove, rebuilt = (key, layout.checksum_key(key)), "the next run that needs it"
            if layout.is_scoring_key(key) and name in (layout.SCORED_PREDICTIONS, layout.SCORING_PAGE):
                # Its summary.json marks the scoring done: it goes too, or scoring the images again would do nothing.
                remove += (f"{key.rpartition('/')[0]}/{layout.SCORING_SUMMARY}",)
                rebuilt = "scoring the same images with the same model again (from the stored parts)"
            elif layout.is_scoring_key(key):  # a part
                rebuilt = "the next scoring of its images"
            return _differs(data, recorded, "recorded beside it"), remove, rebuilt, size
        return "", (), "", size


def _keys(storage: Storage, dataset: str | None, run: str | None) -> list[ObjectInfo]:
    prefixes = []
    if dataset:
        prefixes.append(layout.dataset_prefix(dataset) + "/")
    if run:
        prefixes.append(layout.run_prefix(run) + "/")
    objects = [o for p in (prefixes or [""]) for o in storage.list_info(p)]
    # Checksum records are checked with their objects; leases are live state, not data; what is not ours is left alone.
    return [o for o in objects if not o.key.endswith(layout.CHECKSUM_SUFFIX) and not layout.is_lease_key(o.key)
            and (layout.describe_key(o.key)[0] != "other" or layout.is_scoring_key(o.key))]  # fmt: skip


def verify_storage(storage: Storage, *, dataset: str | None = None, run: str | None = None, repair: bool = False,
                   progress: Callable[[int, int], None] | None = None) -> Report:  # fmt: skip
    """Check every object (of one dataset and/or run, or all); with `repair`, remove what is corrupt (see module doc)."""
    started = time.monotonic()
    objects = _keys(storage, dataset, run)
    verifier = _Verifier(storage)
    report = Report()

    def one(obj: ObjectInfo):
        try:
            return obj, verifier.check(obj.key)
        except FileNotFoundError:  # removed since the listing (gc, a repair): nothing to check
            return obj, None

    with ThreadPoolExecutor(WORKERS, thread_name_prefix="verify") as pool:
        for done, (obj, result) in enumerate(pool.map(one, objects), 1):
            if progress is not None:
                progress(done, len(objects))
            if result is None:
                continue
            problem, remove, rebuilt_by, size = result
            report.checked += 1
            report.bytes += size
            if problem == "":
                report.unverifiable.append(obj.key)
            elif problem is not None:
                report.corrupt.append(Finding(obj.key, problem, remove, rebuilt_by))
    if repair:
        for key in dict.fromkeys(k for f in report.corrupt for k in f.remove):
            storage.delete(key)
            report.removed.append(key)
    report.seconds = time.monotonic() - started
    return report


def lines(storage: Storage, report: Report, *, repair: bool) -> Iterator[str]:
    """What the command prints: one line per corrupt object, then a summary."""
    for f in report.corrupt:
        yield f"CORRUPT {storage.url(f.key)}: {f.problem}; rebuilt by {f.rebuilt_by} once removed"
    for key in report.removed:
        yield f"removed {storage.url(key)}"
    if report.unverifiable:
        yield (f"{len(report.unverifiable)} object(s) carry no checksum to check (records such as model cards, "
               f"reports and results, or objects written by an earlier version), e.g. "
               f"{storage.url(report.unverifiable[0])}")  # fmt: skip
    verdict = f"{len(report.corrupt)} corrupt"
    if report.corrupt and not repair:
        verdict += " (rerun with --repair to remove them; the next run rebuilds them)"
    yield (f"checked {report.checked:,} object(s), {report.bytes / 1e6:,.1f} MB, in {report.seconds:.1f}s "
           f"in {storage.uri}: {verdict}")  # fmt: skip
