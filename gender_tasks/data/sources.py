"""Dataset sources: one string selects where the labeled images come from.

    /path/to/folder            folder-per-class (female/, male/; any case; below one wrapping folder)
    /path/to/file.zip          the same layout inside a zip
    s3://bucket/prefix         the same layout under an S3 prefix
    kaggle:owner/slug          a Kaggle dataset, downloaded through kagglehub

Each resolves to a local folder that `ingest` scans.
"""

from __future__ import annotations

import logging
import shutil
import socket
import tempfile
import time
import unicodedata
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..environment import get_flag
from ..errors import PermanentError
from ..settings import RunConfig
from ..storage import DISK_FULL_ERRNOS, DiskFullError, disk_full, human_bytes, is_remote_location
from .folders import MAX_DEPTH, show_copy_as, shown

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
# A zip entry or S3 key with more parts than this is refused before a byte is written: wrapping folders,
# the class folder, MAX_DEPTH folders below it and the file (a class folder 1,200 levels down would
# otherwise exhaust path lengths while unpacking).
MAX_COPY_PARTS = 2 * MAX_DEPTH + 2
NAME_SHOWN = 120  # characters of an over-long name that a message shows
COPY_CHUNK_BYTES = 1 << 20


class SourceError(PermanentError):
    """The dataset source is missing, unreachable or malformed; the message says what to do."""


def is_kaggle(source: str) -> bool:
    return source.startswith("kaggle:")


def check_kaggle_reachable(timeout: float = 5.0) -> None:
    """Fail within seconds, with the fix, where Kaggle cannot be reached."""
    if get_flag("GENDER_OFFLINE", error=SourceError):
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


def _copy_folder(target: Path) -> Path:
    """The folder a message names for a copy of a source in `target`: the temporary folder (TMPDIR) it
    lies below, never the copy's own temporary name, which means nothing to the user."""
    tmp = Path(tempfile.gettempdir()).resolve()
    return tmp if target.is_relative_to(tmp) else target.parent


def _copy_full(exc: OSError, target: Path, needed: int, *, verb: str) -> DiskFullError:
    folder = _copy_folder(target)
    return disk_full(exc, folder, needed, what=f"the temporary folder {folder} used to {verb} the source",
                     fix="free space there, or set TMPDIR to a folder on a larger disk; nothing of the copy is "
                         "left behind")  # fmt: skip


def _check_copy_size(source: str, target: Path, total: int, max_bytes: int, *, verb: str, fix: str) -> None:
    """Refuse a source that would copy (unpack, download) over the source limit, or into more than the
    free disk: `verb` says the copy ("expand", "download"), `fix` how to do without it."""
    if total > max_bytes:
        raise SourceError(
            f"{source} would {verb} to {human_bytes(total)}, over the {human_bytes(max_bytes)} limit "
            f"(setting max_source_bytes): refused before a byte was written; {fix}, or raise max_source_bytes"
        )
    folder = _copy_folder(target)
    existing = next((p for p in (target, *target.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(existing).free
    if total + DISK_SPARE_BYTES > free:
        raise SourceError(
            f"{source} would {verb} to {human_bytes(total)} but {folder} has {human_bytes(free)} free "
            f"(and {human_bytes(DISK_SPARE_BYTES)} is kept spare): refused before a byte was written; free disk "
            "space, or set TMPDIR to a larger disk"
        )


def _abbreviated(name: str) -> str:
    return shown(name if len(name) <= NAME_SHOWN else name[:NAME_SHOWN] + "…")


def _refuse_bad_names(names: list[str], item: Callable[[str], str], fix: str) -> None:
    """Refuse, before a byte is written, names (zip entries, S3 keys; folders end in "/") that could not
    each become their own file in the copy, so that nothing is silently lost or merged: the same name
    twice (a zip may hold both, an unpack keeps the last), one name both a file and a folder, names that
    differ only in case or Unicode normalization (one overwrites the other on a disk that ignores them,
    as macOS's and Windows' do), and names more than MAX_COPY_PARTS deep. `item(name)` names one as the
    user knows it; `fix` ends the message."""
    for name in names:
        if name.rstrip("/").count("/") + 1 > MAX_COPY_PARTS:
            depth = name.count("/")  # the folders it lies in (or is)
            raise SourceError(f"{item(_abbreviated(name))} is {depth} folders deep, more than any dataset needs "
                              f"(at most {MAX_DEPTH} below a class folder): refused before a byte was written; "
                              f"{fix}")  # fmt: skip
    files = [n for n in names if not n.endswith("/")]
    counts = Counter(files)
    twice = sorted(n for n, k in counts.items() if k > 1)
    if twice:
        raise SourceError(f"{item(shown(twice[0]))} is in the archive {counts[twice[0]]} times"
                          f"{f' (and {len(twice) - 1} more names)' if len(twice) > 1 else ''}: unpacking keeps only "
                          f"the last, so the others would be lost silently; {fix}")  # fmt: skip
    folders = {n.rstrip("/") for n in names if n.endswith("/")}
    folders |= {n[:i] for n in names for i, c in enumerate(n) if c == "/"}
    both = sorted(set(files) & folders)
    if both:
        inside = next(n for n in names if n.startswith(both[0] + "/"))
        raise SourceError(f"{item(shown(both[0]))} is both a file and a folder (beside {item(shown(inside))}): "
                          f"one of them cannot be copied; {fix}")  # fmt: skip
    spelled: dict[str, str] = {}
    for name in sorted(set(files) | folders):
        folded = unicodedata.normalize("NFC", name).casefold()
        if spelled.setdefault(folded, name) != name:
            raise SourceError(
                f"{item(shown(spelled[folded]))} and {item(shown(name))} differ only in case (or Unicode "
                "normalization): on a disk that ignores it one would overwrite the other, and class folders are "
                f"matched ignoring case; {fix}"
            )


def _refuse_bad_parts(name: str, what: str, fix: str) -> None:
    """Refuse a name with '.', '..' or empty parts: an unpack would silently drop or resolve them, so
    the copy would not hold it under its own name (and might hold it outside the copy)."""
    if any(p in ("", ".", "..") for p in name.rstrip("/").split("/")):
        raise SourceError(f"{what} has empty, '.' or '..' parts in its name: it cannot be copied under its own "
                          f"name; {fix}")  # fmt: skip


def safe_extract_zip(archive: Path, target: Path, *, max_bytes: int = RunConfig.max_source_bytes) -> Path:
    """Extract `archive` into `target` (a new or empty folder), entry by entry, each checked against its
    CRC as it is written.

    Refused before a byte is unpacked: entries that escape `target` or that could not each become
    their own file (see _refuse_bad_names), decompression bombs, an empty archive and one larger than
    `max_bytes` or the free disk. A corrupt entry, a full disk or any other failure while unpacking
    raises a permanent error naming the entry, and leaves nothing of `target` behind.
    """
    target = target.resolve()
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise SourceError(f"{archive} is not a readable zip file ({exc}); re-download or re-create it") from None

    def entry(name: str) -> str:
        return f"entry '{name}' of {shown(archive)}"

    fix = "re-create the archive with plain, distinct relative names"
    with zf:
        infos = zf.infolist()
        total = 0
        for info in infos:
            dest = (target / info.filename).resolve()
            if info.filename.startswith("/") or not dest.is_relative_to(target):
                raise SourceError(
                    f"zip entry {info.filename!r} in {archive} would be written outside the target folder; "
                    "the archive is unsafe, re-create it with relative paths only"
                )
            _refuse_bad_parts(info.filename, entry(_abbreviated(info.filename)), fix)
            total += info.file_size
            if info.compress_size and info.file_size / info.compress_size > MAX_ZIP_RATIO:
                raise SourceError(
                    f"zip entry {info.filename!r} in {archive} expands {info.file_size / info.compress_size:.0f}x "
                    f"(limit {MAX_ZIP_RATIO}x): refused as a decompression bomb; re-create the archive"
                )
        if not any(not info.is_dir() for info in infos):
            raise SourceError(f"{archive} holds no files; zip the folder that has female/ and male/ in it")
        _refuse_bad_names([info.filename for info in infos], entry, fix)
        _check_copy_size(str(archive), target, total, max_bytes, verb="expand",
                         fix="unpack it yourself and give the folder")  # fmt: skip
        show_copy_as(target, lambda rel: entry(rel) if rel else shown(archive))
        written, done = 0, False
        try:
            for info in infos:  # the first file's folders make `target`
                try:
                    _extract_entry(zf, info, target, entry(shown(info.filename)))
                except OSError as exc:
                    if exc.errno in DISK_FULL_ERRNOS:
                        raise _copy_full(exc, target, total - written, verb="unpack") from None
                    raise SourceError(f"{entry(shown(info.filename))} cannot be unpacked ({exc.strerror or exc}); "
                                      f"{fix}") from None  # fmt: skip
                written += info.file_size
            done = True
        finally:
            if not done:  # half an archive is no source: nothing of it stays
                shutil.rmtree(target, ignore_errors=True)
    return target


def _extract_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, what: str) -> None:
    """Unpack one entry (its name checked by safe_extract_zip) into a new file; zipfile checks its CRC-32
    as the last byte is read, so a corrupt entry fails here, named, and never reaches the scan."""
    dest = target / info.filename
    if info.is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with zf.open(info) as src, open(dest, "xb") as out:  # "x": never overwrite (names are distinct)
            shutil.copyfileobj(src, out, COPY_CHUNK_BYTES)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise SourceError(f"{what} is corrupt ({exc}): the archive is damaged; re-download or re-create it") from None
    except (RuntimeError, NotImplementedError) as exc:  # encrypted, or a compression zipfile cannot read
        raise SourceError(f"{what} cannot be unpacked ({exc}); re-create the archive without a password, "
                          "compressed with deflate (zip's default)") from None  # fmt: skip


def download_remote_source(source: str, target: Path, *, workers: int = 16,
                           max_bytes: int = RunConfig.max_source_bytes) -> Path:  # fmt: skip
    """Download every object under a remote source (`s3://bucket/prefix`, or the location of any other
    registered storage scheme) into `target` (a new or empty folder), in parallel; messages name the
    scheme ("the S3 source ...").

    S3 uses the pipeline's S3 configuration (AWS variables or the connection in GENDER_S3_CONN_ID).
    The bounded storage check runs first, so a dead endpoint fails within seconds, as a SourceError
    (a source that cannot be read is no outage a retry outlasts). Keys that would land outside
    `target` or could not each become their own file (see _refuse_bad_names), and a listing whose
    sizes add up to more than `max_bytes` or the free disk, are refused before anything is written;
    a failure while downloading leaves nothing of `target` behind.
    """
    from ..storage import StorageConfigError, StorageError, open_storage
    from ..storage.locations import parse_location

    kind = f"{parse_location(source).scheme.upper()} source"
    try:
        storage = open_storage(source)
        storage.check(writable=False)  # a source is only read: no write probe
    except StorageConfigError:
        raise
    except StorageError as exc:
        raise SourceError(f"the {kind} {source} cannot be read: {exc}") from None
    listed = [o for o in storage.list_info("") if not o.key.endswith("/")]  # "folder" markers hold nothing
    keys = [o.key for o in listed]
    if not keys:
        raise SourceError(f"the {kind} {source} holds no objects; check the bucket and prefix")
    target = target.resolve()

    def url(key: str) -> str:
        return f"{storage.uri}/{key}"

    fix = "rename or remove the object"
    for key in keys:
        parts = key.split("/")
        if key.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise SourceError(
                f"the object {storage.uri}/{key} of the {kind} has a key that would be written outside the target "
                "folder (empty, '.' or '..' parts); rename or remove it"
            )
    _refuse_bad_names(keys, url, fix)
    total = sum(o.size for o in listed)
    _check_copy_size(source, target, total, max_bytes, verb="download",
                     fix="give a smaller prefix")  # fmt: skip
    show_copy_as(target, lambda rel: url(rel) if rel else storage.uri)
    written: list[int] = []

    def fetch(key: str) -> None:
        path = target / key
        try:
            data = storage.get_bytes(key)
        except FileNotFoundError:
            raise SourceError(f"{url(shown(key))} was deleted while the source was being downloaded; re-run once "
                              "the source is stable") from None  # fmt: skip
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "xb") as out:  # "x": never overwrite (keys are distinct)
                out.write(data)
        except OSError as exc:
            if exc.errno in DISK_FULL_ERRNOS:
                raise _copy_full(exc, target, total - sum(written), verb="download") from None
            raise SourceError(f"{url(shown(key))} cannot be downloaded into a file ({exc.strerror or exc}); "
                              f"{fix}") from None  # fmt: skip
        written.append(len(data))

    started = time.monotonic()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="s3_source")
    try:
        for _ in pool.map(fetch, keys):
            pass
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)  # no download still writing into what is removed
        shutil.rmtree(target, ignore_errors=True)
        raise
    pool.shutdown()
    log.info("downloaded %d objects of %s in %.1fs", len(keys), source, time.monotonic() - started)
    return target


def check_source(source: str) -> None:
    """The checks that cost nothing (no download, no extraction): fail in seconds, with the fix."""
    if not source:
        raise SourceError(f"no dataset source given. {HOW_TO_USE_A_FOLDER}")
    if is_kaggle(source):
        check_kaggle_reachable()
        return
    if is_remote_location(source):
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
    path = Path(source).expanduser()
    if not is_remote_location(source) and not path.is_file():
        return path
    base = Path(workdir or tempfile.mkdtemp(prefix="gender-src-"))
    try:
        if is_remote_location(source):
            return download_remote_source(source, base / "remote", max_bytes=max_bytes)
        return safe_extract_zip(path, base / "zip", max_bytes=max_bytes)
    except BaseException:
        if workdir is None:  # the caller never learns the folder: it is this function's to remove
            shutil.rmtree(base, ignore_errors=True)
        raise
