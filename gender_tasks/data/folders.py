"""The dataset-folder convention every local source follows: one folder per class, images inside.

<root>/female/…, <root>/male/…   (any case; optionally below one wrapping folder, as Kaggle's)
"""

from __future__ import annotations

from pathlib import Path

from ..errors import PermanentError
from ..settings import CLASSES

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class IngestError(PermanentError):
    """The source's layout is wrong; the message names the offending item and the fix."""


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
