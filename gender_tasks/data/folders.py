"""The dataset-folder convention every local source follows, and the walk that judges its files.

<root>/female/…, <root>/male/…   (any case; optionally below one wrapping folder, as Kaggle's)

Everything is decided from names and `lstat`/`stat` alone, before a byte of any file is read:
regular files only (a FIFO would block the reader forever, a device never ends), symbolic links
followed only where they stay inside the source folder, names that are valid UTF-8 without control
characters, and size limits per file and in total. Hidden entries (names starting with ".": editor,
OS and tool caches such as `.DS_Store`, `.cache/`, `.ipynb_checkpoints/`) are skipped and counted,
never taken as images.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PermanentError
from ..settings import CLASSES

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
PROBLEMS_SHOWN = 10


class IngestError(PermanentError):
    """The source's layout is wrong; the message names the offending item and the fix."""


def shown(path: Path | str) -> str:
    """A path as it can be printed safely: bytes that are not UTF-8 as `\\xNN`, control characters escaped."""
    text = os.fsencode(str(path)).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def human_bytes(n: float) -> str:
    """A byte count as people read it: 12.3 kB, 4.5 MB, 10.0 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def name_problem(name: str) -> str:
    """Why a file name is refused ('' if it is not): names travel into CSV, logs, HTML and S3 keys."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "has a name that is not valid UTF-8: rename it (e.g. `convmv -f latin1 -t utf8`)"
    if not name.isprintable():
        return "has control characters (a newline, a tab, …) in its name: rename it"
    return ""


def find_class_dirs(root: Path) -> dict[str, Path]:
    """Map each class to its folder under `root`, names matched case-insensitively.

    The class folders may sit one wrapping folder down (Kaggle's `ThisPersonDoesNotExist/Female`).
    Any other folder beside them is an error: its images would silently be dropped. So are two
    folders of one class in different case (`Female/` and `female/`): one would be dropped.
    """
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    by_name: dict[str, Path] = {}
    for p in subdirs:
        if p.name.lower() in by_name:
            raise IngestError(
                f"{shown(root)} has two folders for one class, {shown(by_name[p.name.lower()].name)!r} and "
                f"{shown(p.name)!r} (names differ only in case); merge them into one folder"
            )
        by_name[p.name.lower()] = p
    if not set(CLASSES) & set(by_name) and len(subdirs) == 1:
        return find_class_dirs(subdirs[0])
    unknown = [shown(p.name) for p in subdirs if p.name.lower() not in CLASSES]
    missing = [c for c in CLASSES if c not in by_name]
    if missing and not unknown:
        raise IngestError(
            f"{shown(root)} has no {' or '.join(missing)} folder; a dataset needs one folder per class "
            f"named {' and '.join(CLASSES)} (any case)"
        )
    if unknown:
        raise IngestError(
            f"unknown class folder(s) {unknown} in {shown(root)}: the classes are exactly {list(CLASSES)}; "
            "rename or remove the folder(s)"
        )
    return {c: by_name[c] for c in CLASSES}


@dataclass
class SourceFiles:
    """What the walk found: images to read (path, label, size) and hidden entries it skipped."""

    files: list[tuple[Path, str, int]] = field(default_factory=list)
    hidden: list[Path] = field(default_factory=list)
    not_images: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # "<path> <why and the fix>"


_KINDS = {stat.S_IFIFO: "FIFO (named pipe)", stat.S_IFCHR: "character device", stat.S_IFBLK: "block device",
          stat.S_IFSOCK: "socket"}  # fmt: skip


def _follow(path: Path, root_real: Path, found: SourceFiles) -> os.stat_result | None:
    """The stat of what `path` names, following a symlink only where it stays inside the source."""
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            target = Path(os.path.realpath(path))
            st = os.stat(path)  # a dangling link fails here: unreadable, whatever it pointed at
            if not target.is_relative_to(root_real):
                found.problems.append(
                    f"{shown(path)} is a symbolic link to {shown(target)}, outside the source folder "
                    f"{shown(root_real)}: links are followed only inside it; copy the file in or remove the link"
                )
                return None
        return st
    except OSError as exc:
        found.problems.append(
            f"{shown(path)} cannot be read ({exc.strerror or exc}): fix its permissions or replace it"
        )
        return None


def _walk(folder: Path, label: str, root_real: Path, max_file_bytes: int, found: SourceFiles, seen: set) -> None:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        found.problems.append(f"{shown(folder)} cannot be listed ({exc.strerror or exc}): fix its permissions")
        return
    for entry in entries:
        path = Path(entry.path)
        if problem := name_problem(entry.name):
            found.problems.append(f"{shown(path)} {problem}")
            continue
        if entry.name.startswith("."):
            found.hidden.append(path)
            continue
        st = _follow(path, root_real, found)
        if st is None:
            continue
        if stat.S_ISDIR(st.st_mode):
            real = os.path.realpath(path)
            if real in seen:  # a link back up, or a second path to the same images
                found.problems.append(
                    f"{shown(path)} leads to a folder already scanned ({shown(real)}): remove the link"
                )
                continue
            seen.add(real)
            _walk(path, label, root_real, max_file_bytes, found, seen)
        elif not stat.S_ISREG(st.st_mode):
            kind = _KINDS.get(stat.S_IFMT(st.st_mode), "special file")
            found.problems.append(f"{shown(path)} is a {kind}, not a regular file: remove it (never opened)")
        elif path.suffix.lower() not in IMAGE_SUFFIXES:
            found.not_images.append(path)
        elif st.st_size > max_file_bytes:
            found.problems.append(
                f"{shown(path)} is {human_bytes(st.st_size)}, over the {human_bytes(max_file_bytes)} per-file limit "
                "(setting max_file_bytes): remove or downscale it, or raise max_file_bytes if it is genuine"
            )
        else:
            found.files.append((path, label, st.st_size))


def _refuse(what: str, items: list[str]) -> None:
    if items:
        more = f" (and {len(items) - PROBLEMS_SHOWN} more)" if len(items) > PROBLEMS_SHOWN else ""
        raise IngestError(
            f"{len(items)} {what} refused, nothing was written: {'; '.join(items[:PROBLEMS_SHOWN])}{more}"
        )


def list_images(root: Path, *, max_file_bytes: int, max_total_bytes: int) -> list[tuple[Path, str, int]]:
    """Every image below the class folders of `root`, as (path, label, size), judged without reading one.

    Refuses (IngestError, naming the files and the fix) special files, links leaving the source,
    bad names, files over `max_file_bytes` or a total over `max_total_bytes`, files that are not
    images and empty classes. Hidden entries are skipped, and the skip is logged with examples.
    """
    class_dirs = find_class_dirs(root)
    root_real = Path(os.path.realpath(root))
    found = SourceFiles()
    for label, folder in class_dirs.items():
        if not Path(os.path.realpath(folder)).is_relative_to(root_real):
            found.problems.append(f"{shown(folder)} is a symbolic link to {shown(os.path.realpath(folder))}, outside "
                                  f"the source folder {shown(root_real)}: point the source at the real folder")  # fmt: skip
            continue
        _walk(folder, label, root_real, max_file_bytes, found, {os.path.realpath(folder)})
    _refuse("file(s)", found.problems)
    if found.not_images:
        first, rest = found.not_images[0], found.not_images[1:]
        more = f" (and {len(rest)} more: {', '.join(map(shown, rest[: PROBLEMS_SHOWN - 1]))})" if rest else ""
        raise IngestError(
            f"{shown(first)} is not an image (suffix {first.suffix or 'none'!r}){more}; class folders must "
            f"hold only images ({', '.join(sorted(IMAGE_SUFFIXES))}): move or delete it"
        )
    if found.hidden:
        log.warning("skipped %d hidden file(s) or folder(s) (names starting with '.'), e.g. %s",
                    len(found.hidden), ", ".join(map(shown, found.hidden[:3])))  # fmt: skip
    for label, folder in class_dirs.items():
        if not any(lbl == label for _, lbl, _ in found.files):
            raise IngestError(f"class folder {shown(folder)} holds no images; every class needs at least one")
    total = sum(size for _, _, size in found.files)
    if total > max_total_bytes:
        raise IngestError(
            f"{shown(root)} holds {human_bytes(total)} of images, over the {human_bytes(max_total_bytes)} limit "
            "(setting max_source_bytes): ingest a subset, or raise max_source_bytes"
        )
    return found.files


def read_regular(path: Path, max_bytes: int) -> bytes:
    """The bytes of `path`, which must still be a regular file of at most `max_bytes`.

    The walk judged it from `stat`; opening without blocking and checking the open file again
    means a FIFO or device swapped in since can neither hang nor flood this read.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "no longer a regular file")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise OSError(errno.EFBIG, f"grew over the {human_bytes(max_bytes)} per-file limit (max_file_bytes)")
    return data
