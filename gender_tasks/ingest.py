"""Ingest: scan a folder-per-class dataset, describe every image, upload it content-addressed.

Layout in storage:
    datasets/<dataset_id>/images/<label>/<sha256>.<ext>
    datasets/<dataset_id>/manifest.csv      one row per image, written last (the commit marker)

The dataset id is derived from the images' hashes and labels, so re-ingesting the same content is
a no-op that returns the same id. Images that do not decode are kept in the manifest with their
error, so that validation can stop the run naming every bad file at once.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .config import CLASSES
from .errors import PermanentError
from .storage import Storage, put_many

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MANIFEST_COLUMNS = [
    "key", "label", "sha256", "bytes", "width", "height", "format", "decodable", "error", "source_path",
]  # fmt: skip


class IngestError(PermanentError):
    """The source's layout is wrong; the message names the offending item and the fix."""


def dataset_prefix(dataset_id: str) -> str:
    return f"datasets/{dataset_id}"


def manifest_key(dataset_id: str) -> str:
    return f"{dataset_prefix(dataset_id)}/manifest.csv"


def find_class_dirs(root: Path) -> dict[str, Path]:
    """Map each class to its folder under `root`, names matched case-insensitively.

    The class folders may sit one wrapping folder down (Kaggle's `ThisPersonDoesNotExist/Female`).
    Any other folder beside them is an error: its images would silently be dropped.
    """
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    by_name = {p.name.lower(): p for p in subdirs}
    if not set(CLASSES) & set(by_name) and len(subdirs) == 1:
        return find_class_dirs(subdirs[0])
    unknown = [p.name for p in subdirs if p.name.lower() not in CLASSES]
    missing = [c for c in CLASSES if c not in by_name]
    if missing and not unknown:
        raise IngestError(
            f"{root} has no {' or '.join(missing)} folder; a dataset needs one folder per class "
            f"named {' and '.join(CLASSES)} (any case)"
        )
    if unknown:
        raise IngestError(
            f"unknown class folder(s) {unknown} in {root}: the classes are exactly {list(CLASSES)}; "
            "rename or remove the folder(s)"
        )
    return {c: by_name[c] for c in CLASSES}


@dataclass
class _Scanned:
    row: dict
    data: bytes


def _describe(path: Path, label: str, root: Path, max_pixels: int) -> _Scanned:
    from PIL import Image

    data = path.read_bytes()
    row = {
        "label": label,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "width": 0,
        "height": 0,
        "format": "",
        "decodable": False,
        "error": "",
        "source_path": path.relative_to(root).as_posix(),
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                row["width"], row["height"], row["format"] = img.width, img.height, (img.format or "").lower()
                if img.width * img.height > max_pixels:
                    raise ValueError(
                        f"{img.width}x{img.height} px exceeds the {max_pixels:,} px limit (decompression bomb?)"
                    )
                img.load()
        row["decodable"] = True
    except Exception as exc:  # PIL raises many types for corrupt data
        row["error"] = f"{type(exc).__name__}: {exc}"
    return _Scanned(row, data)


def scan_folder(root: Path, *, max_pixels: int = 40_000_000, workers: int = 8) -> list[_Scanned]:
    """Read and describe every image below the class folders of `root`."""
    class_dirs = find_class_dirs(root)
    files: list[tuple[Path, str]] = []
    for label, folder in class_dirs.items():
        for path in sorted(folder.rglob("*")):
            if path.is_dir() or path.name.startswith("."):
                continue  # hidden files: .DS_Store and friends
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise IngestError(
                    f"{path} is not an image (suffix {path.suffix or 'none'!r}); class folders must hold "
                    f"only images ({', '.join(sorted(IMAGE_SUFFIXES))}): move or delete it"
                )
            files.append((path, label))
    for label, folder in class_dirs.items():
        if not any(lbl == label for _, lbl in files):
            raise IngestError(f"class folder {folder} holds no images; every class needs at least one")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda f: _describe(f[0], f[1], root, max_pixels), files))


def compute_dataset_id(rows: list[dict]) -> str:
    digest = hashlib.sha256()
    for sha, label in sorted((r["sha256"], r["label"]) for r in rows):
        digest.update(f"{sha} {label}\n".encode())
    return "ds-" + digest.hexdigest()[:16]


def _image_key(dataset_id: str, row: dict) -> str:
    ext = Path(row["source_path"]).suffix.lower() or ".bin"
    return f"{dataset_prefix(dataset_id)}/images/{row['label']}/{row['sha256']}{ext}"


def ingest_folder(root: Path, storage: Storage, *, max_pixels: int = 40_000_000) -> dict:
    """Upload a folder-per-class dataset into `storage`; a no-op if that content is already there."""
    started = time.monotonic()
    scanned = scan_folder(root, max_pixels=max_pixels)
    rows = [s.row for s in scanned]
    dataset_id = compute_dataset_id(rows)
    for row in rows:
        row["key"] = _image_key(dataset_id, row)
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS).sort_values(["label", "sha256", "source_path"])
    total_bytes = sum(r["bytes"] for r in rows)
    summary = {
        "dataset_id": dataset_id,
        "manifest_uri": storage.url(manifest_key(dataset_id)),
        "images": len(rows),
        "bytes": total_bytes,
        "uploaded": 0,
        "source_root": str(root),
    }
    if storage.exists(manifest_key(dataset_id)):
        log.info("dataset %s (%d images) is already in %s: nothing to upload", dataset_id, len(rows), storage.uri)
        return summary

    present = set(storage.list(f"{dataset_prefix(dataset_id)}/images/"))  # resume an interrupted ingest
    todo = {}
    for s in scanned:
        if s.row["key"] not in present:
            todo[s.row["key"]] = s.data  # identical images share one key
    uploaded = sent_bytes = 0
    batch: list[tuple[str, bytes]] = []
    for i, (key, data) in enumerate(todo.items(), 1):
        batch.append((key, data))
        if len(batch) == 256 or i == len(todo):
            uploaded += put_many(storage, batch)
            sent_bytes += sum(len(d) for _, d in batch)
            batch = []
            elapsed = max(time.monotonic() - started, 1e-6)
            log.info(
                "ingest %s: %d/%d files uploaded (%.1f MB/s)", dataset_id, uploaded, len(todo), sent_bytes / elapsed / 1e6
            )
    storage.put_bytes(manifest_key(dataset_id), manifest.to_csv(index=False).encode())
    summary["uploaded"] = uploaded
    log.info(
        "ingested %s: %d images (%.1f MB), %d uploaded, in %.1fs",
        dataset_id, len(rows), total_bytes / 1e6, uploaded, time.monotonic() - started,
    )  # fmt: skip
    return summary


def read_manifest(storage: Storage, key: str) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(storage.get_bytes(key)), keep_default_na=False)
