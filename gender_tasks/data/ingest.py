"""Ingest: scan a folder-per-class dataset, describe every image, upload it content-addressed.

Layout in storage:
    datasets/<dataset_id>/images/<label>/<sha256>.<ext>
    datasets/<dataset_id>/manifest.csv      one row per image, written last (the commit marker)

The dataset id is derived from the images' hashes and labels, so re-ingesting the same content is
a no-op that returns the same id. A scan judges the whole source before anything is written, and
refuses (IngestError, naming every offending file and the fix): what the folder walk refuses
(see folders.py: special files, links out of the source, bad names, size limits, non-images, empty
or case-colliding classes), unreadable files, decompression bombs (from the header, never
decoded), files that do not decode or are under `min_image_side`, (nearly) blank images, the same
image twice, and classes with too few images for every split to hold both. Validation checks the
same things again on the manifest: a second line of defence, not the first.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .. import layout
from ..errors import PermanentError, decode_failure
from ..leases import hold_lease, holder_name
from ..settings import RunConfig
from ..storage import DiskFullError, Storage, human_bytes, put_many
from .folders import IngestError, list_images, listed, read_regular, shown
from .images import PHASH_DECODE_SIZE, decode_rgb, image_phash
from .manifest import MANIFEST_COLUMNS, dataset_id_of, read_manifest, write_manifest
from .parallel import cpu_pool
from .split import min_groups_per_class

log = logging.getLogger(__name__)

SCAN_WORKERS = 8
# From this many files the scan runs in one process per core, in chunks: hashing and the phash's
# Python and numpy work hold the GIL (threads reached 1.2 of 2 cores on 10,000 faces). Below it,
# starting processes (about 0.5 s of imports each) costs more than it saves.
MIN_FILES_FOR_PROCESSES = 2_000
SCAN_CHUNK_FILES = 256
# Uploads are latency-bound: more requests in flight than cores (but past ~16 threads the
# client's own CPU, signing and parsing under the GIL, slows them down again; see bench/RESULTS.md).
UPLOAD_WORKERS = 16
PROGRESS_EVERY_S = 5.0
COPIES_SHOWN = 3
# An image whose decoded pixels vary by less than this (standard deviation, in 8-bit levels, in every
# channel) is blank: white, black, one colour, or a 16-bit or transparent image decoded wrongly. It
# holds no face, and blank images share one phash, so near-duplicate grouping would put them all in
# one split. Flat fields measure under 1 (8-bit rounding and JPEG noise); 3,000 real faces of
# ../shared/data measured 15.6 at the least, 36 at the 5th percentile (at the phash's decode scale).
BLANK_STD_LEVELS = 2.0


@dataclass(frozen=True)
class Limits:
    """What a source may hold; the defaults are RunConfig's (the one source of defaults)."""

    max_pixels: int = RunConfig.max_image_pixels
    min_side: int = RunConfig.min_image_side
    max_file_bytes: int = RunConfig.max_file_bytes
    max_source_bytes: int = RunConfig.max_source_bytes
    split: tuple[float, ...] = RunConfig.split

    @classmethod
    def of(cls, settings) -> Limits:
        return cls(settings.max_image_pixels, settings.min_image_side, settings.max_file_bytes,
                   settings.max_source_bytes, tuple(settings.split))  # fmt: skip


@dataclass
class _Scanned:
    row: dict
    path: Path
    problem: str = ""  # why ingest refuses this file (unreadable, a bomb, undecodable, too small, blank); '': none


class _Progress:
    """Logs `<what> done/total files (MB, MB/s)` at most every PROGRESS_EVERY_S seconds, and at the end."""

    def __init__(self, what: str, total: int):
        self.what, self.total, self.nbytes = what, total, 0
        self.started = self.last = time.monotonic()

    def update(self, done: int, nbytes: int) -> None:
        self.nbytes += nbytes
        now = time.monotonic()
        if done == self.total or now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            log.info("%s %d/%d files, %.1f MB (%.1f MB/s)", self.what, done, self.total, self.nbytes / 1e6,
                     self.nbytes / max(now - self.started, 1e-6) / 1e6)  # fmt: skip


def _describe(path: Path, label: str, root: Path, limits: Limits, judged: dict[str, tuple[dict, str]]) -> _Scanned:
    """Read and hash one file; judge its content once per distinct content (`judged`, by sha256).

    10,000 copies of one image are read and hashed 10,000 times but decoded once (and then all
    refused as copies).
    """
    source_path = path.relative_to(root).as_posix()
    row = {"label": label, "source_path": source_path, "sha256": "", "bytes": 0, "width": 0, "height": 0,
           "format": "", "decodable": False, "error": "", "phash": ""}  # fmt: skip
    try:
        data = read_regular(path, limits.max_file_bytes)
    except OSError as exc:
        return _Scanned(row, path, f"cannot be read ({exc.strerror or exc}): fix its permissions or replace it")
    sha = hashlib.sha256(data).hexdigest()
    if sha not in judged:  # two threads may judge the same content at once: the same answer twice
        judged[sha] = _judge(data, limits)
    content, problem = judged[sha]
    row.update(content, sha256=sha, bytes=len(data))
    return _Scanned(row, path, problem)


def _judge(data: bytes, limits: Limits) -> tuple[dict, str]:
    """What a file's content is (its manifest fields) and why ingest refuses it ('' if it does not).

    The header is judged before decoding, so a decompression bomb is refused undecoded. The one
    decode (images.decode_rgb, JPEGs at reduced scale: every entropy-coded byte is still decoded, so
    truncated or corrupt files fail as at full size) gives both the perceptual hash and the check
    that the image is not blank.
    """
    from PIL import Image

    row: dict = {}
    if not data:
        return row, "is empty (0 bytes): remove it, or replace it with the image"
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            row.update(width=img.width, height=img.height, format=(img.format or "").lower())
    except Image.DecompressionBombError as exc:  # Pillow's own limit, raised by open() from the header
        return row, f"is refused undecoded as a decompression bomb ({exc}); remove or downscale it"
    except Exception as exc:  # PIL raises many types for what is not an image
        return row, f"is not an image Pillow can read ({decode_failure(exc)}): remove or replace it"
    size = f"{row['width']}x{row['height']} px"
    if row["width"] * row["height"] > limits.max_pixels:
        return row, (f"is {size}, over the {limits.max_pixels:,} px limit (setting max_image_pixels): refused undecoded "
                     "as a likely decompression bomb; remove or downscale it, or raise max_image_pixels if it is genuine")  # fmt: skip
    if min(row["width"], row["height"]) < limits.min_side:
        return row, (f"is {size}, under the {limits.min_side} px minimum on its shorter side (setting min_image_side): "
                     "remove it, or lower min_image_side")  # fmt: skip
    try:
        decoded = decode_rgb(data, PHASH_DECODE_SIZE)  # the decode training sees, at the phash's scale
        row.update(decodable=True, phash=image_phash(decoded))
    except Exception as exc:  # truncated or corrupt data
        row.update(decodable=False, error=decode_failure(exc))
        return row, f"does not decode ({row['error']}): the file is truncated or corrupt; replace it"
    return row, _blank(np.asarray(decoded))


def _blank(pixels: np.ndarray) -> str:
    """Why a decoded image is refused as (nearly) blank, or '' if it is not (see BLANK_STD_LEVELS)."""
    spread = max(float(pixels[..., channel].std()) for channel in range(3))  # per channel: 5x faster than axis=
    if spread >= BLANK_STD_LEVELS:
        return ""
    channels = pixels.reshape(-1, 3)
    low, high = channels.min(axis=0).tolist(), channels.max(axis=0).tolist()
    mean = tuple(round(float(v)) for v in channels.mean(axis=0))
    return (f"is a (nearly) blank image (its pixels stay near RGB{mean}: a standard deviation of {spread:.2f} levels, "
            f"under {BLANK_STD_LEVELS:g}, with values from {low} to {high}): it holds no face; remove or replace it")  # fmt: skip


def _refuse_copies(scanned: list[_Scanned]) -> None:
    """The same image twice would sit in the dataset twice (and could straddle two splits): refuse it."""
    by_sha: dict[str, list[_Scanned]] = {}
    for s in scanned:
        by_sha.setdefault(s.row["sha256"], []).append(s)
    copies = [group for group in by_sha.values() if len(group) > 1]
    if not copies:
        return
    lines, full = [], []
    for group in copies:
        names = [f"{shown(s.path)} ({s.row['label']})" for s in group]
        both = " under both labels: keep it only in its right class" if len({s.row["label"] for s in group}) > 1 else ""
        more = f" and {len(group) - COPIES_SHOWN:,} more copies" if len(group) > COPIES_SHOWN else ""
        lines.append(f"{', '.join(names[:COPIES_SHOWN])}{more} are the same image{both}")
        full.append(f"{', '.join(names)} are the same image{both}")  # the log names every copy
    shown_ = listed(lines, "repeated image", logged=full)
    raise IngestError(f"{len(copies)} image(s) appear more than once, nothing was written: {shown_}. "
                      "Delete the copies, keeping one of each")  # fmt: skip


def _refuse_small_classes(scanned: list[_Scanned], split: tuple[float, ...], root: Path) -> None:
    """Every split needs both classes (training, validation and the test metrics all do)."""
    need = min_groups_per_class(split)
    counts = {label: 0 for label in sorted({s.row["label"] for s in scanned})}
    for s in scanned:
        counts[s.row["label"]] += 1
    short = {label: n for label, n in counts.items() if n < need}
    if short:
        shares = "/".join(f"{f * 100:g}" for f in split)
        have = ", ".join(f"{label} {n}" for label, n in short.items())
        raise IngestError(
            f"too few distinct images in {shown(root)} ({have}): the {shares} split needs at least {need} per class "
            "so that every split holds both classes; add images, or change the setting split"
        )


def _describe_chunk(chunk: list[tuple[Path, str, int]], root: Path, limits: Limits) -> list[_Scanned]:
    """One worker process's share of the scan (content judged once per distinct content within it)."""
    judged: dict[str, tuple[dict, str]] = {}
    return [_describe(path, label, root, limits, judged) for path, label, _size in chunk]


def _describe_all(files: list[tuple[Path, str, int]], root: Path, limits: Limits, *, threads: int,
                  processes: int | None) -> Iterator[_Scanned]:  # fmt: skip
    """Every file described, in order: on `threads` threads for a small set (reads overlap, and
    one process's imports would cost more than the decoding), else in chunks on `processes`
    worker processes (default one per core)."""
    with cpu_pool(len(files), processes, MIN_FILES_FOR_PROCESSES, threads=threads) as pool:
        if isinstance(pool, ThreadPoolExecutor):  # one content judgement shared by every thread
            judged: dict[str, tuple[dict, str]] = {}
            yield from pool.map(lambda f: _describe(f[0], f[1], root, limits, judged), files)
            return
        chunks = [files[i : i + SCAN_CHUNK_FILES] for i in range(0, len(files), SCAN_CHUNK_FILES)]
        for described in pool.map(functools.partial(_describe_chunk, root=root, limits=limits), chunks):
            yield from described


def scan_folder(root: Path, limits: Limits | None = None, *, workers: int = SCAN_WORKERS,
                processes: int | None = None) -> list[_Scanned]:  # fmt: skip
    """Read, hash, measure and decode every image below the class folders of `root`.

    Refuses (IngestError, naming every offending file and the fix) everything in this module's
    docstring; returns one accepted, decoded image per item, with its manifest row. `workers`
    threads scan a small set; from MIN_FILES_FOR_PROCESSES files, `processes` processes (default
    one per core) do.
    """
    limits = limits or Limits()
    files = list_images(root, max_file_bytes=limits.max_file_bytes, max_total_bytes=limits.max_source_bytes)
    progress = _Progress("ingest: scanned", len(files))
    scanned: list[_Scanned] = []
    for item in _describe_all(files, root, limits, threads=workers, processes=processes):
        scanned.append(item)
        progress.update(len(scanned), item.row["bytes"])
    refused = [s for s in scanned if s.problem]
    if refused:
        shown_ = listed([f"{shown(s.path)} {s.problem}" for s in refused], "refused file")
        raise IngestError(f"{len(refused)} file(s) refused, nothing was written: {shown_}")
    _refuse_copies(scanned)
    _refuse_small_classes(scanned, limits.split, root)
    return scanned


def compute_dataset_id(rows: list[dict]) -> str:
    return dataset_id_of((r["sha256"], r["label"]) for r in rows)


def _load(item: _Scanned, max_bytes: int) -> bytes:
    """The file's bytes again, for upload (the scan decoded them; they are not decoded twice).

    Refuses a file that changed since it was scanned: its key names the content it had then.
    """
    try:
        data = read_regular(item.path, max_bytes)
    except OSError as exc:
        raise IngestError(f"{shown(item.path)} cannot be read any more ({exc.strerror or exc}); re-run once the "
                          "source is stable") from None  # fmt: skip
    if hashlib.sha256(data).hexdigest() != item.row["sha256"]:
        raise IngestError(f"{shown(item.path)} changed while it was being ingested; re-run once the source is stable")
    return data


def _refresh_phashes(storage: Storage, dataset_id: str, rows: list[dict]) -> None:
    """A manifest written by an earlier decode (images.DECODE_VERSION) holds the perceptual hashes that decode
    saw (decode 1 hashed every 16-bit image as blank); the scan just hashed the same images with this one.
    Where they differ the manifest gets this scan's hashes, its rows otherwise kept (splits are keyed by the
    decode version, so no split grouped by the old hashes is reused)."""
    key = layout.manifest_key(dataset_id)
    stored = read_manifest(storage, key, dataset_id=dataset_id)
    fresh = stored["sha256"].map({r["sha256"]: r["phash"] for r in rows})
    changed = fresh.notna() & fresh.ne(stored["phash"])
    if changed.any():
        log.info("dataset %s: %d perceptual hash(es) in its manifest came from an earlier image decode: updating "
                 "them", dataset_id, int(changed.sum()))  # fmt: skip
        stored.loc[changed, "phash"] = fresh[changed]
        write_manifest(storage, key, stored)


def _absent(storage: Storage, dataset_id: str, scanned: list, max_file_bytes: int) -> list[tuple[str, Callable]]:
    """The scanned images that are not in storage as scanned, each with its loader for put_many: missing, or there
    with another size (a damaged copy, a FIFO put in its place). The keys are content addresses, so one listing
    with sizes says it; bytes of the right size but changed are verify-on-read's to find."""
    stored = {o.key: o.size for o in storage.list_info(layout.images_prefix(dataset_id))}
    return [(s.row["key"], functools.partial(_load, s, max_file_bytes)) for s in scanned
            if stored.get(s.row["key"]) != s.row["bytes"]]  # fmt: skip


def _lease(storage: Storage, dataset_id: str):
    """A lease on the dataset while ingest uploads to it: gc removes nothing of it (leases.py), however long."""
    return hold_lease(storage, layout.dataset_lease_key(dataset_id, holder_name("ingest")),
                      owner=f"ingest of {dataset_id}")  # fmt: skip


class _Written:
    """The storage as put_many sees it, remembering each object it wrote (in this attempt)."""

    def __init__(self, storage: Storage):
        self.storage, self.keys = storage, []

    def put_bytes(self, key: str, data: bytes) -> None:
        self.storage.put_bytes(key, data)
        self.keys.append(key)  # list.append is atomic: put_many's threads may call this at once


def _undone(exc: PermanentError, written: _Written, storage: Storage, dataset_id: str, *,
            todo_bytes: int) -> PermanentError:  # fmt: skip
    """Remove the objects this ingest wrote before `exc` stopped it; the same error, saying so (and for a
    full disk, how much the whole upload needs)."""
    failed = []
    for key in written.keys:
        try:
            storage.delete(key)
        except Exception as delete_exc:  # a storage that broke down meanwhile: say which objects stay
            failed.append((key, delete_exc))
    need = ""
    if isinstance(exc, DiskFullError):
        need = f" Ingesting dataset {dataset_id} needs about {human_bytes(todo_bytes)} there in all."
    undone = f" The {len(written.keys)} object(s) this ingest had written were removed again"
    if failed:
        undone += (f", except {len(failed)} that could not be (e.g. {storage.url(failed[0][0])}: {failed[0][1]}); "
                   "they are unreferenced and safe to delete")  # fmt: skip
    log.warning("ingest %s failed after writing %d object(s); %d removed", dataset_id, len(written.keys),
                len(written.keys) - len(failed))  # fmt: skip
    return type(exc)(f"{str(exc).rstrip('.')}.{need}{undone}: nothing is left half-written.")


def ingest_folder(root: Path, storage: Storage, limits: Limits | None = None, *,
                  upload_workers: int = UPLOAD_WORKERS) -> dict:  # fmt: skip
    """Upload a folder-per-class dataset into `storage`; a no-op if that content is already there.

    First a scan reads, hashes, measures and decodes every file: everything ingest refuses is found
    before the first write, and the hashes give the dataset id. Then each image is read again and
    uploaded, in parallel (a large dataset never sits in memory whole). The manifest is written
    last, as the commit marker: an interrupted upload resumes where it stopped, its objects being
    content-addressed. A failure no retry can fix (a full disk, a file changed meanwhile) removes the
    objects this attempt wrote, and says so: nothing is left that no manifest refers to.
    """
    limits = limits or Limits()
    started = time.monotonic()
    storage.check()  # unreachable storage, missing credentials or bucket: fail before the long scan
    scan_started = time.monotonic()
    scanned = scan_folder(root, limits)
    scan_seconds = time.monotonic() - scan_started
    rows = [s.row for s in scanned]
    dataset_id = compute_dataset_id(rows)
    for row in rows:
        row["key"] = layout.image_key(dataset_id, row["label"], row["sha256"], row["source_path"])
    total_bytes = sum(r["bytes"] for r in rows)
    summary = {
        "dataset_id": dataset_id,
        "manifest_uri": storage.url(layout.manifest_key(dataset_id)),
        "images": len(rows),
        "bytes": total_bytes,
        "uploaded": 0,
        "source_root": shown(root),  # as the user named it, never a temporary copy's path
        "scan_seconds": round(scan_seconds, 2),
        "upload_seconds": 0.0,
    }
    if storage.exists(layout.manifest_key(dataset_id)):
        # Committed, but its images may have gone since (removed by hand or by a bucket's lifecycle rule, or a
        # `verify --repair` stopped between an image and its manifest): the source is here, so upload them again.
        if missing := _absent(storage, dataset_id, scanned, limits.max_file_bytes):
            log.warning("dataset %s is in %s, but %d of its %d images are not (removed or damaged since it was "
                        "ingested, e.g. %s): uploading them again from the source", dataset_id, storage.uri,
                        len(missing), len(rows), storage.url(missing[0][0]))  # fmt: skip
            with _lease(storage, dataset_id):
                summary["uploaded"] = put_many(storage, missing, workers=upload_workers)
        else:
            log.info("dataset %s (%d images) is already in %s: nothing to upload", dataset_id, len(rows), storage.uri)
        _refresh_phashes(storage, dataset_id, rows)
        return summary

    upload_started = time.monotonic()
    with _lease(storage, dataset_id) as lease:
        todo = _absent(storage, dataset_id, scanned, limits.max_file_bytes)  # resume an interrupted ingest
        todo_keys = {key for key, _ in todo}
        todo_bytes = sum(s.row["bytes"] for s in scanned if s.row["key"] in todo_keys)
        progress = _Progress(f"ingest {dataset_id}: uploaded", len(todo))
        written = _Written(storage)
        try:
            uploaded = put_many(written, todo, workers=upload_workers, progress=progress.update)
            # Before the commit, every image must be there: a gc that started before the lease was written, or
            # ran while it lapsed, may have removed some (of an earlier, interrupted ingest) since the listing.
            lease.renew()
            gone = _absent(storage, dataset_id, scanned, limits.max_file_bytes)
            if gone:
                log.warning("ingest %s: %d image(s) were removed during the upload (lease lapsed: %s); uploading "
                            "them again", dataset_id, len(gone), lease.lapsed)  # fmt: skip
                uploaded += put_many(written, gone, workers=upload_workers)
            manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS).sort_values(["label", "sha256", "source_path"])
            write_manifest(storage, layout.manifest_key(dataset_id), manifest)
        except PermanentError as exc:
            # No retry follows, so what this attempt wrote would stay behind, unreferenced: remove it (not
            # what was there before, which an earlier attempt, or another run, may still need). A retryable
            # error keeps it: the retry resumes from it.
            raise _undone(exc, written, storage, dataset_id, todo_bytes=todo_bytes) from None
    summary["uploaded"] = uploaded
    summary["upload_seconds"] = round(time.monotonic() - upload_started, 2)
    log.info(
        "ingested %s: %d images (%.1f MB), %d uploaded, in %.1fs (scan %.1fs)",
        dataset_id, len(rows), total_bytes / 1e6, uploaded, time.monotonic() - started, scan_seconds,
    )  # fmt: skip
    return summary
