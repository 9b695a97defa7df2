"""What every storage backend shares: the interface, its errors, the rules for keys, and what is built on the
interface alone (verify-on-read with `.sha256` sidecars, parallel writes).

Keys are POSIX-style relative paths ("datasets/<id>/manifest.csv"). Every write is atomic: no reader
ever sees half an object. Nothing here knows a backend: each backend module (local, s3) implements
Storage and registers its URI scheme with locations.register_scheme.
"""

from __future__ import annotations

import errno
import logging
import re
import shutil
import stat
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..errors import PermanentError
from ..integrity import mismatch, repair_hint, sha256_hex, verify_bytes
from ..layout import checksum_key

log = logging.getLogger("gender_tasks.storage")

# check() proves a storage writable by writing and deleting a small object under this reserved key;
# list() never shows it.
PROBE_PREFIX = ".gender-probe"
PROBE_BODY = b"gender_tasks storage check: safe to delete\n"
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class StorageError(RuntimeError):
    """Storage cannot be reached or used; the message says which location and what to do."""


class StorageConfigError(StorageError, PermanentError):
    """Storage is misconfigured (no credentials, no such bucket, access denied): a retry cannot help."""


class DiskFullError(PermanentError):
    """A local disk (or the user's quota on it) is full: a retry would write into the same full disk.
    The message says which folder, how much it has free, about how much is needed, and the fix."""


# A write that fails with one of these found no room: no space left on the device, or the quota used up.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# What a path is when it is no regular file (stat.S_IFMT), in words: a source's walk refuses these unopened, and
# local storage refuses one in an object's place.
FILE_KINDS = {stat.S_IFIFO: "FIFO (named pipe)", stat.S_IFCHR: "character device", stat.S_IFBLK: "block device",
              stat.S_IFSOCK: "socket", stat.S_IFDIR: "folder"}  # fmt: skip


def file_kind(mode: int) -> str:
    """The kind of file a stat mode names, for a message ("FIFO (named pipe)", "folder", ...)."""
    return FILE_KINDS.get(stat.S_IFMT(mode), "special file")


def human_bytes(n: float) -> str:
    """A byte count as people read it: 12.3 kB, 4.5 MB, 10.0 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def disk_full(exc: OSError, folder: str | Path, needed: int, *, what: str, fix: str) -> DiskFullError:
    """The DiskFullError for `exc` (an OSError in DISK_FULL_ERRNOS) raised writing into `folder`: `what`
    names the folder to the user ("the storage folder"), `needed` is about how many bytes were still to
    be written, `fix` what to do. `folder` is measured, never shown, where `what` names it already."""
    existing = next((p for p in (Path(folder), *Path(folder).parents) if p.exists()), Path("/"))
    try:
        free = human_bytes(shutil.disk_usage(existing).free)
    except OSError:
        free = "an unknown amount"
    full = "the disk quota there is used up" if exc.errno == errno.EDQUOT else "its disk has no space left"
    return DiskFullError(f"{what} is full ({full}: {free} free, about {human_bytes(needed)} more needed); {fix}")


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object as a listing sees it: what garbage collection weighs (size) and ages (modified)."""

    key: str
    size: int
    modified: float  # seconds since the epoch


class Storage(Protocol):
    """What the pipeline needs of a storage; a backend implements it and registers its URI scheme
    (locations.register_scheme). Keys are checked with check_key, list prefixes with check_prefix.

    Optional, where a backend has folders of its own (LocalStorage): remove_empty_folders() -> int, which
    `gc` calls after its removals. A bucket has no folders, so S3 has none."""

    uri: str

    def check(self, *, writable: bool = True) -> None: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...  # a missing key: FileNotFoundError naming url(key)
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str) -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def url(self, key: str) -> str: ...
    def copy(self, src: str, dst: str) -> None: ...
    def list_info(self, prefix: str) -> list[ObjectInfo]: ...
    def local_path(self, key: str) -> Path | None: ...  # the file behind a key on this machine; None if remote


def check_key(key: str) -> str:
    """`key` if it is a valid storage key (a relative path without '..' or empty parts), else StorageError."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"invalid storage key {key!r}: keys are relative paths without '..' or empty parts")
    return key


def check_prefix(prefix: str) -> str:
    """A list prefix: empty, or a key that may end in '/'."""
    if prefix:
        check_key(prefix.removesuffix("/"))
    return prefix


def probe_key() -> str:
    """A fresh key for check()'s probe object, under PROBE_PREFIX (which list() leaves out)."""
    return f"{PROBE_PREFIX}/{uuid.uuid4().hex}"


def is_probe(key: str) -> bool:
    return key.startswith(PROBE_PREFIX + "/")


# --- verify-on-read: the same on every backend ------------------------------------------------------------


def read_verified(storage: Storage, key: str, sha256: str, *, what: str = "") -> bytes:
    """The object at `key`, checked against the sha256 recorded when it was written.

    A mismatch raises integrity.IntegrityError (permanent), naming the object and how to repair it.
    """
    data = storage.get_bytes(key)
    return verify_bytes(data, sha256, what=what or storage.url(key), fix=repair_hint(storage.uri))


def put_recorded(storage: Storage, key: str, data: bytes) -> str:
    """Write `data` at `key` with its sha256 beside it (checksum_key), for objects that are not
    content-addressed but are read back later (manifests, splits, cache indexes, audits); returns the sha256.

    The checksum goes first: a write interrupted between the two leaves a checksum without its object,
    which readers take as a missing object (and the writer's rerun rewrites both), never an object
    that cannot be checked.
    """
    sha = sha256_hex(data)
    storage.put_bytes(checksum_key(key), sha.encode() + b"\n")
    storage.put_bytes(key, data)
    return sha


def recorded_sha256(storage: Storage, key: str) -> str | None:
    """The sha256 recorded beside `key` by put_recorded, or None for an object written without one."""
    try:
        text = storage.get_bytes(checksum_key(key)).decode("ascii", "replace").strip()
    except FileNotFoundError:
        return None
    if not _SHA256_HEX.match(text):
        raise mismatch(f"the checksum record {storage.url(checksum_key(key))}", "(a sha256)", text or "(empty)",
                       repair_hint(storage.uri))  # fmt: skip
    return text


def get_recorded(storage: Storage, key: str, sha256: str | None = None) -> bytes:
    """The object at `key`, checked against `sha256` (from a run record) or else the sha256 recorded
    beside it. An object written before checksums were recorded (no record) is read with a warning.
    """
    expected = sha256 or recorded_sha256(storage, key)
    if expected is None:
        data = storage.get_bytes(key)
        log.warning("%s has no recorded checksum (written by an earlier version): read unverified; "
                    "`python -m gender_tasks verify --repair` lists such objects", storage.url(key))  # fmt: skip
        return data
    return read_verified(storage, key, expected)


def put_many(storage: Storage, items: Iterable[tuple[str, bytes | Callable[[], bytes]]], *, workers: int = 16,
             progress: Callable[[int, int], None] | None = None) -> int:  # fmt: skip
    """Write many objects in parallel (S3 latency dominates single-threaded uploads); returns the count.

    An item's data may be a zero-argument callable that returns the bytes, read only when its turn
    comes, so a large dataset never sits in memory whole. `progress(done, nbytes)` is called after
    each write, from this thread. The first failure stops the rest and is raised.
    """
    items = list(items)
    if not items:
        return 0

    def put(item: tuple[str, bytes | Callable[[], bytes]]) -> int:
        key, data = item
        payload = data() if callable(data) else data
        storage.put_bytes(key, payload)
        return len(payload)

    pool = ThreadPoolExecutor(max_workers=min(workers, len(items)), thread_name_prefix="put_many")
    try:
        futures = [pool.submit(put, item) for item in items]
        for done, future in enumerate(as_completed(futures), 1):
            nbytes = future.result()
            if progress is not None:
                progress(done, nbytes)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return len(items)
