"""Ingest: scan a folder-per-class dataset, describe every image, upload it content-addressed.

Layout in storage:
    datasets/<dataset_id>/images/<label>/<sha256>.<ext>
    datasets/<dataset_id>/manifest.csv      one row per image, written last (the commit marker)

The dataset id is derived from the images' hashes and labels, so re-ingesting the same content is
a no-op that returns the same id. A scan judges the whole source before anything is written: it
refuses (IngestError, naming the files and the fix) non-images, unknown or empty class folders,
unreadable files and decompression bombs (from the header, never decoded). Images that do not
decode are kept in the manifest with their error, so that validation can stop the run naming
every bad file at once; each decodable one gets its perceptual hash (`phash`, for near-duplicates).
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .. import layout
from ..storage import Storage, put_many
from .folders import IMAGE_SUFFIXES, IngestError, find_class_dirs
from .images import phash_of_bytes
from .manifest import MANIFEST_COLUMNS, write_manifest
from .parallel import cpu_pool

log = logging.getLogger(__name__)

SCAN_WORKERS = 8
# Uploads are latency-bound: more requests in flight than cores (but past ~16 threads the
# client's own CPU, signing and parsing under the GIL, slows them down again; see bench/RESULTS.md).
UPLOAD_WORKERS = 16
PROGRESS_EVERY_S = 5.0
PROBLEMS_SHOWN = 10
# Images per decode job sent to a worker process, and the set size below which processes cost more
# to start (each imports this module) than they save.
DECODE_CHUNK = 256
MIN_IMAGES_FOR_PROCESSES = 1024


@dataclass
class _Scanned:
    row: dict
    path: Path
    problem: str = ""  # why ingest refuses this file (unreadable, absurdly large); empty: none


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


def _describe(path: Path, label: str, root: Path, max_pixels: int) -> _Scanned:
    """Read, hash and measure one image from its header; nothing is decoded here.

    Everything ingest refuses shows here (unreadable, over the pixel limit), so the whole source
    is judged before the first upload; decoding waits for `_decode`.
    """
    from PIL import Image

    source_path = path.relative_to(root).as_posix()
    try:
        data = path.read_bytes()
    except OSError as exc:
        return _Scanned({"label": label, "source_path": source_path}, path,
                        f"cannot be read ({exc.strerror or exc}): fix its permissions or replace it")  # fmt: skip
    row = {
        "label": label,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "width": 0,
        "height": 0,
        "format": "",
        "decodable": False,
        "error": "",
        "source_path": source_path,
        "phash": "",
    }
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            row["width"], row["height"], row["format"] = img.width, img.height, (img.format or "").lower()
    except Image.DecompressionBombError as exc:  # Pillow's own limit, raised by open() from the header
        return _Scanned(row, path, f"is refused undecoded as a decompression bomb ({exc}); remove or downscale it")
    except Exception as exc:  # no header: `_decode` records the error for validation to report
        row["error"] = f"{type(exc).__name__}: {exc}"
    if row["width"] * row["height"] > max_pixels:
        return _Scanned(row, path, (
            f"is {row['width']}x{row['height']} px, over the {max_pixels:,} px limit (setting max_image_pixels): "
            "refused undecoded as a likely decompression bomb; remove or downscale it, or raise max_image_pixels "
            "if it is genuine"))  # fmt: skip
    return _Scanned(row, path)


def _decode(data: bytes) -> dict:
    """Decode an image and hash it perceptually: {decodable, error, phash} for its manifest row.

    JPEGs decode at reduced scale (see images.phash_of_bytes): every entropy-coded byte is still
    decoded, so truncated or corrupt files fail here as they would at full size.
    """
    try:
        return {"decodable": True, "error": "", "phash": phash_of_bytes(data)}
    except Exception as exc:  # PIL raises many types for corrupt data; validation names these files
        return {"decodable": False, "error": f"{type(exc).__name__}: {exc}", "phash": ""}


def _list_images(class_dirs: dict[str, Path]) -> list[tuple[Path, str]]:
    """Every image below the class folders; refuses other files and empty classes, naming them."""
    files: list[tuple[Path, str]] = []
    not_images: list[Path] = []
    for label, folder in class_dirs.items():
        for path in sorted(folder.rglob("*")):
            if path.is_dir() or path.name.startswith("."):
                continue  # hidden files: .DS_Store and friends
            if path.suffix.lower() in IMAGE_SUFFIXES:
                files.append((path, label))
            else:
                not_images.append(path)
    if not_images:
        more = f" (and {len(not_images) - 1} more: {', '.join(map(str, not_images[1:PROBLEMS_SHOWN]))})" if len(
            not_images) > 1 else ""  # fmt: skip
        raise IngestError(
            f"{not_images[0]} is not an image (suffix {not_images[0].suffix or 'none'!r}){more}; class folders must "
            f"hold only images ({', '.join(sorted(IMAGE_SUFFIXES))}): move or delete it"
        )
    for label, folder in class_dirs.items():
        if not any(lbl == label for _, lbl in files):
            raise IngestError(f"class folder {folder} holds no images; every class needs at least one")
    return files


def scan_folder(root: Path, *, max_pixels: int = 40_000_000, workers: int = SCAN_WORKERS) -> list[_Scanned]:
    """Read, hash and measure (from the header) every image below the class folders of `root`.

    Refuses (IngestError, naming every offending file and the fix) non-image files, empty classes,
    unreadable files and images over `max_pixels`; images that merely fail to decode are kept, with
    their error, for validation to report together with the other data checks.
    """
    files = _list_images(find_class_dirs(root))
    progress = _Progress("ingest: scanned", len(files))
    scanned: list[_Scanned] = []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="scan") as pool:
        for item in pool.map(lambda f: _describe(f[0], f[1], root, max_pixels), files):
            scanned.append(item)
            progress.update(len(scanned), item.row.get("bytes", 0))
    refused = [s for s in scanned if s.problem]
    if refused:
        shown = "; ".join(f"{s.path} {s.problem}" for s in refused[:PROBLEMS_SHOWN])
        more = f" (and {len(refused) - PROBLEMS_SHOWN} more)" if len(refused) > PROBLEMS_SHOWN else ""
        raise IngestError(f"{len(refused)} file(s) refused, nothing was written: {shown}{more}")
    return scanned


def compute_dataset_id(rows: list[dict]) -> str:
    digest = hashlib.sha256()
    for sha, label in sorted((r["sha256"], r["label"]) for r in rows):
        digest.update(f"{sha} {label}\n".encode())
    return "ds-" + digest.hexdigest()[:16]


def _read_checked(path: Path, sha256: str) -> bytes:
    """The file's bytes again; refuses a file that changed since it was scanned: its key names the
    content it had then."""
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise IngestError(f"{path} changed while it was being ingested; re-run once the source is stable")
    return data


def _decode_files(files: list[tuple[str, str]]) -> list[dict]:
    """Runs in a worker process: decode and perceptually hash each (path, sha256)."""
    return [_decode(_read_checked(Path(path), sha)) for path, sha in files]


def _decode_all(decoder: Executor, items: list[_Scanned]) -> Callable[[], dict[str, dict]]:
    """Queue every image's decoding on `decoder` (it overlaps the uploads); returns a function that
    waits for it and gives {sha256: {decodable, error, phash}}, logging progress."""
    chunks = [items[i : i + DECODE_CHUNK] for i in range(0, len(items), DECODE_CHUNK)]
    jobs = [decoder.submit(_decode_files, [(str(s.path), s.row["sha256"]) for s in chunk]) for chunk in chunks]

    def results() -> dict[str, dict]:
        decoded: dict[str, dict] = {}
        progress = _Progress("ingest: decoded", len(items))
        for chunk, job in zip(chunks, jobs, strict=True):
            for item, result in zip(chunk, job.result(), strict=True):
                decoded[item.row["sha256"]] = result
            progress.update(len(decoded), sum(s.row["bytes"] for s in chunk))
        return decoded

    return results


def ingest_folder(root: Path, storage: Storage, *, max_pixels: int = 40_000_000,
                  upload_workers: int = UPLOAD_WORKERS) -> dict:  # fmt: skip
    """Upload a folder-per-class dataset into `storage`; a no-op if that content is already there.

    First a scan reads, hashes and measures every file: everything ingest refuses is found before
    the first write, and the hashes give the dataset id. Then each image is read again, decoded,
    perceptually hashed and uploaded, in parallel (decoding overlaps the uploads' network waits,
    and a large dataset never sits in memory whole). The manifest is written last, as the commit
    marker: an interrupted upload resumes where it stopped, its objects being content-addressed.
    """
    started = time.monotonic()
    storage.check()  # unreachable storage, missing credentials or bucket: fail before the long scan
    scan_started = time.monotonic()
    scanned = scan_folder(root, max_pixels=max_pixels)
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
        "source_root": str(root),
        "scan_seconds": round(scan_seconds, 2),
        "upload_seconds": 0.0,
    }
    if storage.exists(layout.manifest_key(dataset_id)):
        log.info("dataset %s (%d images) is already in %s: nothing to upload", dataset_id, len(rows), storage.uri)
        return summary

    present = set(storage.list(layout.images_prefix(dataset_id)))  # resume an interrupted ingest
    unique: dict[str, _Scanned] = {}
    for s in scanned:
        unique.setdefault(s.row["key"], s)  # identical images share one key
    upload_started = time.monotonic()
    # Decoding and perceptual hashing (CPU, partly under the GIL) in one process per core; uploads
    # (waiting on the network) on threads meanwhile. Images an interrupted run uploaded are only decoded.
    with cpu_pool(len(unique), None, MIN_IMAGES_FOR_PROCESSES) as decoder:
        wait_decoded = _decode_all(decoder, list(unique.values()))
        todo = [(key, functools.partial(_read_checked, s.path, s.row["sha256"])) for key, s in unique.items()
                if key not in present]  # fmt: skip
        progress = _Progress(f"ingest {dataset_id}: uploaded", len(todo))
        uploaded = put_many(storage, todo, workers=upload_workers, progress=progress.update)
        decoded = wait_decoded()
    for row in rows:
        row.update(decoded[row["sha256"]])
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS).sort_values(["label", "sha256", "source_path"])
    write_manifest(storage, layout.manifest_key(dataset_id), manifest)
    summary["uploaded"] = uploaded
    summary["upload_seconds"] = round(time.monotonic() - upload_started, 2)
    log.info(
        "ingested %s: %d images (%.1f MB), %d uploaded, in %.1fs (scan %.1fs)",
        dataset_id, len(rows), total_bytes / 1e6, uploaded, time.monotonic() - started, scan_seconds,
    )  # fmt: skip
    return summary
