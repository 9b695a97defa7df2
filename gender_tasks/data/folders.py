"""The dataset-folder convention every local source follows, and the walk that judges its files.

<root>/female/…, <root>/male/…   (any case; optionally below one wrapping folder, as Kaggle's)

Everything is decided from names and `lstat`/`stat` alone, before a byte of any file is read:
regular files only (a FIFO would block the reader forever, a device never ends), symbolic links
followed only where they stay inside the source folder, names that are valid UTF-8 without control
or bidirectional-text characters, folders at most MAX_DEPTH deep, and size limits per file and in
total. Hidden entries (names starting with ".": editor, OS and tool caches such as `.DS_Store`,
`.cache/`, `.ipynb_checkpoints/`, macOS's `._name` twins) and what operating systems write beside a
user's files (SYSTEM_NAMES: the `__MACOSX/` folder of every zip macOS's Finder makes, Windows Explorer's
`Thumbs.db` and `desktop.ini`, a drive root's `System Volume Information/`, `$RECYCLE.BIN/` and `lost+found/`)
are skipped and counted, never taken as images or as class folders.

A zip or S3 source is scanned as a local copy in a temporary folder; `show_copy_as` makes every
message name its items as the user knows them (an entry of the zip, an S3 URL), never by the
temporary path, which means nothing to the user and is gone when they read the message.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PermanentError
from ..settings import CLASSES
from ..storage import file_kind, human_bytes

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
PROBLEMS_SHOWN = 10
# A refusal with more problems than an error message shows logs every one (up to this many lines), so that a
# source with a hundred bad files is fixed in one pass, not ten.
PROBLEMS_LOGGED = 10_000
# Folders deeper than this below a class folder (or wrapping folders above it) are refused: no real
# dataset nests so deep, and a walk of thousands of levels would hit path-length and recursion limits.
MAX_DEPTH = 32
# Invisible characters a name may hold between two non-ASCII characters: the zero-width non-joiner and
# joiner, which Persian and Indic words and emoji sequences ("👩‍🔬") need. Any other format character
# (Unicode category Cf: bidirectional overrides and isolates, zero-width spaces, soft hyphens, tags) can
# make a name display as another one, so it is refused, as are control characters and line separators.
JOINERS = {"\u200c", "\u200d"}
REFUSED_CATEGORIES = {"Cc": "a control character", "Cf": "an invisible formatting character", "Cs": "a surrogate",
                      "Zl": "a line separator", "Zp": "a paragraph separator"}  # fmt: skip
BIDI_CONTROLS = {chr(c) for c in (0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A))}


# Names operating systems and archivers write beside a user's files, never data (matched in any case): a zip
# made by macOS's Finder holds `__MACOSX/` (resource forks: a `._name` twin of every file) beside the folder
# it compressed; Windows Explorer leaves thumbnail caches and folder settings in a folder of pictures; and the
# root of a drive (a dataset copied to a USB stick or a fresh disk) holds Windows' `System Volume Information/`
# and `$RECYCLE.BIN/`, or ext4's `lost+found/`.
SYSTEM_NAMES = {"__macosx", "thumbs.db", "ehthumbs.db", "ehthumbs_vista.db", "desktop.ini",
                "system volume information", "$recycle.bin", "lost+found"}  # fmt: skip


def is_skipped(name: str) -> bool:
    """Hidden (a leading ".") or an operating system's own (SYSTEM_NAMES): skipped and counted, never read."""
    return name.startswith(".") or name.lower() in SYSTEM_NAMES


def log_skipped(paths: list[Path]) -> None:
    if paths:
        log.warning("skipped %d hidden or system file(s) or folder(s) (names starting with '.', __MACOSX, "
                    "Thumbs.db, desktop.ini, a drive's own folders), e.g. %s", len(paths),
                    ", ".join(map(shown, paths[:3])))  # fmt: skip


class IngestError(PermanentError):
    """The source's layout is wrong; the message names the offending item and the fix."""


# Local copies of sources (real path of the copy's root) -> how the user names a path below it.
_COPIES: dict[str, Callable[[str], str]] = {}


def show_copy_as(local_root: Path, name: Callable[[str], str]) -> None:
    """Show every path below `local_root`, a local copy of a source (an unpacked zip, a downloaded S3
    prefix), as `name(relative)` does: `relative` is the POSIX path below the root, already escaped as
    shown() escapes ('' for the root itself)."""
    _COPIES[os.path.realpath(local_root)] = name


def _escaped(text: str) -> str:
    text = os.fsencode(text).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() or c in JOINERS else repr(c)[1:-1] for c in text)


def shown(path: Path | str) -> str:
    """A path as it can be printed safely: bytes that are not UTF-8 as `\\xNN`, control characters escaped;
    below a local copy of a source (see show_copy_as), the name the user knows it by."""
    text = os.fspath(path)
    for local, name in list(_COPIES.items()):
        if text == local or text.startswith(local + os.sep):
            return name(_escaped(text[len(local) + 1 :].replace(os.sep, "/")))
    return _escaped(text)


def name_problem(name: str) -> str:
    """Why a file name is refused ('' if it is not): names travel into CSV, logs, HTML and S3 keys, and
    must show what they are (no character that hides itself or reorders the text around it)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "has a name that is not valid UTF-8: rename it (e.g. `convmv -f latin1 -t utf8`)"
    for i, c in enumerate(name):
        if c in JOINERS and 0 < i < len(name) - 1 and not name[i - 1].isascii() and not name[i + 1].isascii():
            continue
        what = REFUSED_CATEGORIES.get(unicodedata.category(c))
        if what is None:
            continue
        if c in BIDI_CONTROLS:
            what = "a bidirectional-text control, which can make a name display as another one,"
        elif c in JOINERS:
            what += " (joiners are accepted only between two non-ASCII characters, as in emoji and scripts)"
        elif unicodedata.category(c) == "Cc":
            what = "control characters (a newline, a tab, …)"
        code = f"U+{ord(c):04X} {unicodedata.name(c, '')}".rstrip()
        return f"has {what} in its name ({code}): rename it"
    return ""


def find_class_dirs(root: Path, *, say_skipped: bool = True) -> dict[str, Path]:
    """Map each class to its folder under `root`, names matched case-insensitively.

    The class folders may sit one wrapping folder down (Kaggle's `ThisPersonDoesNotExist/Female`),
    or a few (at most MAX_DEPTH). Any other folder beside them is an error: its images would silently
    be dropped. So are two folders of one class in different case (`Female/` and `female/`): one
    would be dropped. Hidden and system folders (is_skipped: `__MACOSX/` beside a zipped folder) are passed
    over, and logged unless `say_skipped` is false (a second look at a source already judged).
    """
    top, skipped = root, []
    for _ in range(MAX_DEPTH + 1):
        try:
            subdirs = sorted(p for p in root.iterdir() if p.is_dir())
        except OSError as exc:
            raise IngestError(f"{shown(root)} cannot be listed ({exc.strerror or exc}): fix its permissions") from None
        skipped += [p for p in subdirs if is_skipped(p.name)]
        subdirs = [p for p in subdirs if not is_skipped(p.name)]
        by_name: dict[str, Path] = {}
        for p in subdirs:
            if p.name.lower() in by_name:
                raise IngestError(
                    f"{shown(root)} has two folders for one class, {shown(by_name[p.name.lower()].name)!r} and "
                    f"{shown(p.name)!r} (names differ only in case); merge them into one folder"
                )
            by_name[p.name.lower()] = p
        if set(CLASSES) & set(by_name) or len(subdirs) != 1:
            break
        root = subdirs[0]  # a wrapping folder: look inside
    else:
        raise IngestError(
            f"{shown(top)} holds only a chain of more than {MAX_DEPTH} single folders ({shown(root)}), no class "
            "folders: point the source at the folder that has female/ and male/ in it"
        )
    if say_skipped:
        log_skipped(skipped)
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
    """What the walk found: images to read (path, label, size) and hidden or system entries it skipped."""

    files: list[tuple[Path, str, int]] = field(default_factory=list)
    hidden: list[Path] = field(default_factory=list)
    not_images: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # "<path> <why and the fix>"


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


def _walk(folder: Path, label: str, root_real: Path, max_file_bytes: int, found: SourceFiles, seen: set,
          depth: int = 0) -> None:  # fmt: skip
    """Judge every entry below `folder`, `depth` folders below its class folder (at most MAX_DEPTH)."""
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
        if is_skipped(entry.name):
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
            if depth >= MAX_DEPTH:
                found.problems.append(
                    f"{shown(path)} is more than {MAX_DEPTH} folders below its class folder: refused unread (too "
                    "deep for any dataset); move its images up, or remove it"
                )
                continue
            seen.add(real)
            _walk(path, label, root_real, max_file_bytes, found, seen, depth + 1)
        elif not stat.S_ISREG(st.st_mode):
            kind = file_kind(st.st_mode)
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


def log_all(items: list[str], what: str) -> str:
    """Log every one of `items` (up to PROBLEMS_LOGGED), one a line ("<what> 12 of 99: ..."), and return what
    an error message says of it: a message shows PROBLEMS_SHOWN, the task log above it names every bad item."""
    for number, item in enumerate(items[:PROBLEMS_LOGGED], 1):
        log.error("%s %d of %d: %s", what, number, len(items), item)
    if len(items) <= PROBLEMS_LOGGED:
        return f"all {len(items):,} are listed in the log above"
    return f"the first {PROBLEMS_LOGGED:,} are listed in the log above"


def listed(items: list[str], what: str, logged: list[str] | None = None) -> str:
    """The first PROBLEMS_SHOWN of `items`, joined for an error message; where there are more, how many, with
    every item logged (log_all): `logged`, one entry per item in a fuller form, where given."""
    if len(items) <= PROBLEMS_SHOWN:
        return "; ".join(items)
    note = log_all(items if logged is None else logged, what)
    return f"{'; '.join(items[:PROBLEMS_SHOWN])} (and {len(items) - PROBLEMS_SHOWN:,} more; {note})"


def _refuse(what: str, items: list[str]) -> None:
    if items:
        raise IngestError(f"{len(items)} {what} refused, nothing was written: {listed(items, f'refused {what}')}")


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
    _judge_found(found, holder="class folders must")
    for label, folder in class_dirs.items():
        if not any(lbl == label for _, lbl, _ in found.files):
            raise IngestError(f"class folder {shown(folder)} holds no images; every class needs at least one")
    _refuse_total(found, root, max_total_bytes, verb="ingest")
    return found.files


def _judge_found(found: SourceFiles, *, holder: str) -> None:
    """What a walk found that is refused (problems, files that are not images), named; hidden skips logged."""
    _refuse("file(s)", found.problems)
    if found.not_images:
        names = [shown(path) for path in found.not_images]
        first, others = found.not_images[0], len(names) - PROBLEMS_SHOWN
        unnamed = f", and {others:,} others; {log_all(names, 'not an image')}" if others > 0 else ""
        more = (
            f" (and {len(names) - 1:,} more: {', '.join(names[1:PROBLEMS_SHOWN])}{unnamed})" if len(names) > 1 else ""
        )
        raise IngestError(
            f"{shown(first)} is not an image (suffix {first.suffix or 'none'!r}){more}; {holder} "
            f"hold only images ({', '.join(sorted(IMAGE_SUFFIXES))}): move or delete it"
        )
    log_skipped(found.hidden)


def _refuse_total(found: SourceFiles, root: Path, max_total_bytes: int, *, verb: str) -> None:
    total = sum(size for _, _, size in found.files)
    if total > max_total_bytes:
        raise IngestError(
            f"{shown(root)} holds {human_bytes(total)} of images, over the {human_bytes(max_total_bytes)} limit "
            f"(setting max_source_bytes): {verb} a subset, or raise max_source_bytes"
        )


def list_unlabeled_images(root: Path, *, max_file_bytes: int, max_total_bytes: int) -> list[tuple[Path, int]]:
    """Every image below `root`, a folder of new images without class folders (what scoring reads), as
    (path, size) sorted by path, judged without reading one: the same rules as list_images.

    Refuses (IngestError, naming the files and the fix) special files, links leaving the folder, bad
    names, folders nested deeper than MAX_DEPTH, files over `max_file_bytes` or a total over
    `max_total_bytes`, files that are not images, and a folder with no image at all. Hidden entries are
    skipped, and the skip is logged with examples.
    """
    try:
        st = os.stat(root)
    except OSError as exc:
        raise IngestError(f"images folder {shown(root)} cannot be read ({exc.strerror or exc}): give a folder, a "
                          ".zip or an s3:// prefix of images") from None  # fmt: skip
    if not stat.S_ISDIR(st.st_mode):
        raise IngestError(f"{shown(root)} is not a folder: give a folder, a .zip or an s3:// prefix of images")
    root_real = Path(os.path.realpath(root))
    found = SourceFiles()
    _walk(root, "", root_real, max_file_bytes, found, {str(root_real)})
    _judge_found(found, holder="a folder to score must")
    if not found.files:
        raise IngestError(f"{shown(root)} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}): give a folder that "
                          "holds the images to score")  # fmt: skip
    _refuse_total(found, root, max_total_bytes, verb="score")
    return sorted((path, size) for path, _, size in found.files)


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
        # Asking for the size it has (not the limit) keeps a read from reserving max_bytes of memory;
        # a file that grew since the stat is read on, still bounded by the limit.
        want = min(st.st_size, max_bytes) + 1
        data = f.read(want)
        if len(data) == want and want <= max_bytes:
            data += f.read(max_bytes + 1 - len(data))
    if len(data) > max_bytes:
        raise OSError(errno.EFBIG, f"grew over the {human_bytes(max_bytes)} per-file limit (max_file_bytes)")
    return data
