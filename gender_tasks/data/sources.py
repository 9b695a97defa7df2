"""Dataset sources: one string selects where the labeled images come from.

    /path/to/folder            folder-per-class (female/, male/; any case; below one wrapping folder)
    /path/to/file.zip          the same layout inside a zip
    s3://bucket/prefix         the same layout under an S3 prefix
    kaggle:owner/slug          a Kaggle dataset, downloaded through kagglehub

Each resolves to a local folder that `ingest` scans.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import PermanentError
from ..settings import RunConfig
from .folders import human_bytes

log = logging.getLogger(__name__)

KAGGLE_HOST = "www.kaggle.com"
HOW_TO_USE_A_FOLDER = (
    "To run on a local copy instead, point the source at a folder with female/ and male/ "
    "subfolders, e.g. `make run SOURCE=/path/to/faces` (or the DAG param `source`)."
)
# A zip entry expanding more than this is refused as a decompression bomb; a whole archive is
# limited by the setting max_source_bytes and by the free disk (keeping this much to spare).
MAX_ZIP_RATIO = 200
DISK_SPARE_BYTES = 1_000_000_000


class SourceError(PermanentError):
    """The dataset source is missing, unreachable or malformed; the message says what to do."""


def is_kaggle(source: str) -> bool:
    return source.startswith("kaggle:")


def check_kaggle_reachable(timeout: float = 5.0) -> None:
    """Fail within seconds, with the fix, where Kaggle cannot be reached."""
    if os.environ.get("GENDER_OFFLINE") == "1":
        raise SourceError(f"Kaggle is not reachable: GENDER_OFFLINE=1 is set. {HOW_TO_USE_A_FOLDER}")
    try:
        with socket.create_connection((KAGGLE_HOST, 443), timeout=timeout):
            pass
    except OSError as exc:
        raise SourceError(
            f"Kaggle ({KAGGLE_HOST}) cannot be reached from this machine ({exc}); no network or a "
            f"proxy blocks it. {HOW_TO_USE_A_FOLDER}"
        ) from None


def download_kaggle(handle: str) -> Path:
    """Download (or reuse kagglehub's cache of) a Kaggle dataset; returns its local folder.
    (`check_source` has made sure Kaggle can be reached.)"""
    import kagglehub

    try:
        return Path(kagglehub.dataset_download(handle))
    except Exception as exc:  # kagglehub raises several unrelated types
        raise SourceError(
            f"downloading the Kaggle dataset {handle!r} failed: {exc}. Public datasets need no "
            "credentials; private ones need KAGGLE_USERNAME and KAGGLE_KEY (or ~/.kaggle/kaggle.json). "
            f"{HOW_TO_USE_A_FOLDER}"
        ) from exc


def _check_copy_size(source: str, target: Path, total: int, max_bytes: int, *, verb: str, fix: str) -> None:
    """Refuse a source that would copy (unpack, download) over the source limit, or into more than the
    free disk: `verb` says the copy ("expand", "download"), `fix` how to do without it."""
    if total > max_bytes:
        raise SourceError(
            f"{source} would {verb} to {human_bytes(total)}, over the {human_bytes(max_bytes)} limit "
            f"(setting max_source_bytes): refused before a byte was written; {fix}, or raise max_source_bytes"
        )
    existing = next((p for p in (target, *target.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(existing).free
    if total + DISK_SPARE_BYTES > free:
        raise SourceError(
            f"{source} would {verb} to {human_bytes(total)} but {existing} has {human_bytes(free)} free "
            f"(and {human_bytes(DISK_SPARE_BYTES)} is kept spare): refused before a byte was written; free disk "
            "space, or set TMPDIR to a larger disk"
        )


def safe_extract_zip(archive: Path, target: Path, *, max_bytes: int = RunConfig.max_source_bytes) -> Path:
    """Extract `archive` into `target`, refusing entries that escape it, decompression bombs, an empty
    archive and one larger than `max_bytes` or the free disk, all before a byte is unpacked."""
    target = target.resolve()
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise SourceError(f"{archive} is not a readable zip file ({exc}); re-download or re-create it") from None
    with zf:
        total = 0
        for info in zf.infolist():
            dest = (target / info.filename).resolve()
            if info.filename.startswith("/") or not dest.is_relative_to(target):
                raise SourceError(
                    f"zip entry {info.filename!r} in {archive} would be written outside the target folder; "
                    "the archive is unsafe, re-create it with relative paths only"
                )
            total += info.file_size
            if info.compress_size and info.file_size / info.compress_size > MAX_ZIP_RATIO:
                raise SourceError(
                    f"zip entry {info.filename!r} in {archive} expands {info.file_size / info.compress_size:.0f}x "
                    f"(limit {MAX_ZIP_RATIO}x): refused as a decompression bomb; re-create the archive"
                )
        if not any(not info.is_dir() for info in zf.infolist()):
            raise SourceError(f"{archive} holds no files; zip the folder that has female/ and male/ in it")
        _check_copy_size(str(archive), target, total, max_bytes, verb="expand",
                         fix="unpack it yourself and give the folder")  # fmt: skip
        zf.extractall(target)
    return target


def download_s3_source(source: str, target: Path, *, workers: int = 16,
                       max_bytes: int = RunConfig.max_source_bytes) -> Path:  # fmt: skip
    """Download every object under an `s3://bucket/prefix` source into `target`, in parallel.

    Uses the pipeline's S3 configuration (AWS variables or the connection in GENDER_S3_CONN_ID).
    Keys that would land outside `target`, and a listing whose sizes add up to more than
    `max_bytes` or the free disk, are refused before anything is written.
    """
    from ..storage import open_storage

    storage = open_storage(source)
    storage.check(writable=False)  # a source is only read: no write probe
    listed = [o for o in storage.list_info("") if not o.key.endswith("/")]  # "folder" markers hold nothing
    keys = [o.key for o in listed]
    if not keys:
        raise SourceError(f"the S3 source {source} holds no objects; check the bucket and prefix")
    target = target.resolve()
    for key in keys:
        parts = key.split("/")
        if key.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise SourceError(
                f"the object {storage.uri}/{key} of the S3 source has a key that would be written outside the target "
                "folder (empty, '.' or '..' parts); rename or remove it"
            )

    _check_copy_size(source, target, sum(o.size for o in listed), max_bytes, verb="download",
                     fix="give a smaller prefix")  # fmt: skip

    def fetch(key: str) -> None:
        path = target / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(storage.get_bytes(key))

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="s3_source") as pool:
        for _ in pool.map(fetch, keys):
            pass
    log.info("downloaded %d objects of %s in %.1fs", len(keys), source, time.monotonic() - started)
    return target


def check_source(source: str) -> None:
    """The checks that cost nothing (no download, no extraction): fail in seconds, with the fix."""
    if not source:
        raise SourceError(f"no dataset source given. {HOW_TO_USE_A_FOLDER}")
    if is_kaggle(source):
        check_kaggle_reachable()
        return
    if source.startswith("s3://"):
        return
    path = Path(source).expanduser()
    if not path.exists():
        raise SourceError(
            f"dataset source {source!r} does not exist. Give a folder with female/ and male/ subfolders, "
            "a .zip of one, s3://bucket/prefix or kaggle:owner/slug"
        )
    if path.is_file() and path.suffix.lower() != ".zip":
        raise SourceError(f"dataset source {source!r} is a file but not a .zip; give a folder or a zip")


def resolve_source(source: str, workdir: Path | None = None, *, max_bytes: int = RunConfig.max_source_bytes) -> Path:
    """Return a local folder holding the dataset that `source` names.

    S3 and zip sources are copied below `workdir` (the caller removes it; default: a new temporary
    folder, which is then the caller's to remove).
    """
    check_source(source)
    if is_kaggle(source):
        return download_kaggle(source.removeprefix("kaggle:"))
    if source.startswith("s3://"):
        return download_s3_source(source, Path(workdir or tempfile.mkdtemp(prefix="gender-src-")) / "s3",
                                  max_bytes=max_bytes)  # fmt: skip
    path = Path(source).expanduser()
    if path.is_file():
        return safe_extract_zip(path, Path(workdir or tempfile.mkdtemp(prefix="gender-src-")) / "zip",
                                max_bytes=max_bytes)  # fmt: skip
    return path
