"""The local backend: a directory on this machine, the embedded default (a plain path or a file:// URI).

A write goes to a temporary file renamed into place, so no reader ever sees half an object. As in S3,
folders are only where objects are: deleting a folder's last object removes the folder (and its parents
up to the storage root, while they are empty), and a write whose new folder was removed in that instant,
by a delete beside it, makes it again.
"""

from __future__ import annotations

import os
import shutil
import stat
import uuid
from pathlib import Path

from ..integrity import NotARegularFile, repair_hint
from .base import (
    DISK_FULL_ERRNOS,
    PROBE_BODY,
    PROBE_PREFIX,
    ObjectInfo,
    StorageConfigError,
    check_key,
    check_prefix,
    disk_full,
    file_kind,
    is_probe,
    probe_key,
)
from .locations import LOCAL_SCHEME, Location, register_scheme

HOW_TO_FREE_STORAGE = (
    "free space on that disk, or choose other storage (--storage, GENDER_STORAGE or the DAG param storage)"
)
# How often a write makes its folder again when a delete beside it removed the folder while it was empty
# (between the write's mkdir and its file's creation): a delete prunes only empty folders, so one retry
# loses only to another delete of the same instant.
FOLDER_RETRIES = 20


def _is_temp(key: str) -> bool:
    """A local write in flight (see LocalStorage.put_bytes) or a check() probe: never listed."""
    name = key.rpartition("/")[2]
    return (name.startswith(".") and name.endswith(".part")) or is_probe(key)


def _write_atomically(path: Path, data: bytes, *, root: Path | None = None) -> None:
    """Write `path` through a temporary file renamed into place: no reader sees half of it.

    A full disk (or quota) removes the temporary file and raises DiskFullError naming `root` (the
    storage folder; default: the file's folder), not the raw OSError: a retry cannot make room.
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.part")
    try:
        # Not tempfile.mkstemp: it creates the file 0600 whatever the umask, so other users (a web
        # server, a worker under another uid) could not read what the pipeline wrote. os.open with
        # 0o666 lets the kernel apply the umask (and default ACLs), as for any ordinary file; O_EXCL
        # and a random name keep concurrent writers of one key apart.
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        fd = _in_folder(path.parent, lambda: os.open(tmp, flags, 0o666))
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        if exc.errno not in DISK_FULL_ERRNOS:
            raise
        folder = root or path.parent
        raise disk_full(exc, folder, len(data), what=f"the storage folder {folder}", fix=HOW_TO_FREE_STORAGE) from None


def _in_folder(folder: Path, create):
    """create() (a file in `folder`), the folder made first; made again if a delete beside this write pruned it
    while it was still empty (LocalStorage.delete), FOLDER_RETRIES times at most."""
    for attempt in range(FOLDER_RETRIES + 1):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return create()
        # FileExistsError too: mkdir(exist_ok=True) raises it when the folder it found existing is gone
        # by the time it checks that it is a folder.
        # (Whether the folder is there now says nothing: another writer may have made it again already.)
        except (FileNotFoundError, FileExistsError):
            if attempt == FOLDER_RETRIES or folder.is_file():
                raise  # still missing after every retry, or a file is where the folder should be


def _files_under(folder: str):
    """The paths of the files under `folder` (symbolic links to files included, links to folders not walked
    into), for list(). Not Path.rglob: it fails on a folder that a delete beside it prunes mid-walk; such a
    folder held nothing, and is skipped."""
    stack = [folder]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                    elif entry.is_file() or not (entry.is_symlink() or entry.is_dir()):
                        yield entry.path  # a FIFO, device or socket too: it sits where an object would (get_bytes)
        except (FileNotFoundError, NotADirectoryError):
            continue


def _prune_empty(folder: Path, root: Path) -> None:
    """Remove `folder` and then its parents, up to (not including) `root`, while each is empty."""
    while folder != root and root in folder.parents:
        try:
            folder.rmdir()
        except OSError:  # not empty, gone already (its deleter prunes on), or not ours to remove: stop
            return
        folder = folder.parent


class LocalStorage:
    """A directory on this machine: the embedded default."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = self.root.as_uri()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageConfigError(
                f"cannot create the storage folder {self.root}: {exc}; choose a writable folder (GENDER_STORAGE)"
            ) from exc

    @classmethod
    def open(cls, location: Location) -> LocalStorage:
        """The opener registered for file:// URIs and plain paths (see locations.register_scheme)."""
        return cls(location.path)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def check(self, *, writable: bool = True) -> None:
        """Fail fast, before any long work, where the folder cannot be created or (if `writable`) written.

        Writing proves it where os.access cannot (read-only mounts, ACLs, a full disk, root squash):
        a probe object is written the way put_bytes writes (not through it: the probe is no data write
        that callers or tests count) and deleted.
        """
        try:
            self.root.mkdir(parents=True, exist_ok=True)  # again: it may have gone since __init__
            if writable:
                probe = self._path(probe_key())
                _write_atomically(probe, PROBE_BODY, root=self.root)  # a full disk: DiskFullError, not "permissions"
                probe.unlink()
                try:
                    (self.root / PROBE_PREFIX).rmdir()
                except OSError:
                    pass  # another check's probe is in it, or it is gone already: either is fine
            elif not os.access(self.root, os.R_OK | os.X_OK):
                raise PermissionError(f"no read access to {self.root}")
        except OSError as exc:
            what = "written" if writable else "read"
            raise StorageConfigError(
                f"the storage folder {self.root} cannot be {what} ({exc}); fix its permissions or choose another "
                "folder (--storage, GENDER_STORAGE or the DAG param storage)"
            ) from None

    def put_bytes(self, key: str, data: bytes) -> None:
        _write_atomically(self._path(key), data, root=self.root)

    def get_bytes(self, key: str) -> bytes:
        """The object's bytes. Opened without blocking and checked once open: a FIFO put where an object
        should be would block a plain read forever, a device never end it; either is a NotARegularFile
        (an IntegrityError: permanent, and what `verify --repair` removes), at once."""
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.url(key)} does not exist") from None
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                why = f"not a regular file but a {file_kind(mode)}"
                fix = (  # verify lists files, and walks into folders: one in an object's place is removed by hand
                    "remove that folder, then rerun: the run rebuilds what was removed"
                    if stat.S_ISDIR(mode)
                    else repair_hint(self.uri)
                )
                raise NotARegularFile(
                    f"{self.url(key)} is {why}: storage objects are plain files, so something other than the "
                    f"pipeline put it there; it was not read. {fix}",
                    why,
                )
            f = os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
        with f:
            return f.read()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        """Keys starting with `prefix` (a plain string prefix, as in S3)."""
        check_prefix(prefix)
        base = self.root / prefix.rpartition("/")[0] if "/" in prefix else self.root
        start = len(os.path.join(self.root, ""))  # the root and its separator (one, even where the root is "/")
        keys = (path[start:].replace(os.sep, "/") for path in _files_under(str(base)))
        return sorted(k for k in keys if k.startswith(prefix) and not _is_temp(k))

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        _prune_empty(path.parent, self.root)

    def remove_empty_folders(self) -> int:
        """Remove every empty folder under the root (never the root): the ones that versions before delete()
        pruned left behind (a finished run's leases/, an audit's fold folder). A write making one of them in
        that instant makes it again (_in_folder). Returns how many went."""
        removed = 0
        for folder, _, _ in os.walk(self.root, topdown=False):  # deepest first: a parent empties after its children
            if folder != str(self.root):
                try:
                    os.rmdir(folder)
                    removed += 1
                except OSError:  # not empty, gone already, or a link to a folder: left alone
                    pass
        return removed

    def copy(self, src: str, dst: str) -> None:
        """`dst` gets `src`'s bytes: a hard link where the file system allows (no space, no time), else a
        copy; either way through a temporary name, so no reader sees half of it. Objects are never
        written in place (put_bytes replaces the file), so the two keys cannot change each other."""
        source, target = self._path(src), self._path(dst)
        if not source.is_file():
            raise FileNotFoundError(f"{self.url(src)} does not exist")
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.part")

        def link_or_copy() -> None:
            try:
                os.link(source, tmp)
            except FileNotFoundError:
                if not source.is_file():
                    raise FileNotFoundError(f"{self.url(src)} does not exist") from None
                raise  # the target's folder went: _in_folder makes it again
            except OSError as exc:  # another device, or a file system without hard links
                if exc.errno in DISK_FULL_ERRNOS:  # not even a directory entry fits: a copy would not either
                    raise
                shutil.copyfile(source, tmp)

        try:
            _in_folder(target.parent, link_or_copy)
            os.replace(tmp, target)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
                raise disk_full(exc, self.root, source.stat().st_size, what=f"the storage folder {self.root}",
                                fix=HOW_TO_FREE_STORAGE) from None  # fmt: skip
            raise

    def list_info(self, prefix: str) -> list[ObjectInfo]:
        """Like list(), with each object's size and modification time."""
        out = []
        for key in self.list(prefix):
            try:
                st = self._path(key).stat()
            except FileNotFoundError:
                continue  # deleted since the listing
            out.append(ObjectInfo(key, st.st_size, st.st_mtime))
        return out

    def url(self, key: str) -> str:
        return self._path(key).as_uri()

    def local_path(self, key: str) -> Path:
        """The file behind a key: lets a browser open a report directly."""
        return self._path(key)


register_scheme(LOCAL_SCHEME, LocalStorage.open)
