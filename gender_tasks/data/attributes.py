"""Extra per-image attributes (age, ethnicity, …) from a source's optional `labels.csv`.

A source folder may carry a `labels.csv` with a `file` column (path relative to the folder) and
attribute columns. They are kept beside the dataset, keyed by content, for per-group accuracy:

    datasets/<dataset_id>/attributes.csv   sha256, <attribute>...   (categorical; numbers binned)
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pandas as pd

from ..layout import attributes_key
from ..storage import Storage
from .folders import find_class_dirs

log = logging.getLogger(__name__)

# Columns that describe the file or the label, not the person.
NOT_ATTRIBUTES = {"file", "label", "width", "height", "source_path", "source_zip", "zip_blob", "zip_member",
                  "categories", "gp_confidence", "sha256", "key", "bytes", "format"}  # fmt: skip
MAX_GROUPS = 12


def find_labels_csv(root: Path) -> Path | None:
    """`labels.csv` beside the class folders (which may sit one wrapping folder down)."""
    dataset_root = next(iter(find_class_dirs(root).values())).parent
    for folder in (dataset_root, root):
        if (folder / "labels.csv").is_file():
            return folder / "labels.csv"
    return None


def categorical_attributes(table: pd.DataFrame) -> pd.DataFrame:
    """The attribute columns as categories: few-valued columns as they are, numbers in quantile bins."""
    out = pd.DataFrame(index=table.index)
    for col in table.columns:
        if col in NOT_ATTRIBUTES:
            continue
        values = table[col]
        if pd.api.types.is_numeric_dtype(values) and values.nunique() > MAX_GROUPS:
            binned = pd.qcut(values, q=5, duplicates="drop")
            out[col] = binned.astype(str)
        elif values.nunique() <= MAX_GROUPS:
            out[col] = values.astype(str)
    return out


def store_attributes(root: Path, storage: Storage, dataset_id: str, manifest: pd.DataFrame) -> int:
    """Save the attributes of the dataset's images, if the source has a labels.csv; returns columns kept."""
    labels_csv = find_labels_csv(root)
    if labels_csv is None:
        return 0
    table = pd.read_csv(labels_csv)
    if "file" not in table.columns:
        log.warning("%s has no 'file' column; its attributes are ignored", labels_csv)
        return 0
    base = labels_csv.parent
    # Manifest paths are relative to the scanned root; labels.csv paths to its own folder.
    rel = {(root / p).resolve().relative_to(base.resolve()).as_posix(): sha
           for p, sha in zip(manifest["source_path"], manifest["sha256"], strict=True)}  # fmt: skip
    table = table[table["file"].isin(rel)].reset_index(drop=True)
    attrs = categorical_attributes(table)
    if attrs.empty or not len(attrs.columns):
        return 0
    attrs.insert(0, "sha256", table["file"].map(rel))
    storage.put_bytes(attributes_key(dataset_id), attrs.drop_duplicates("sha256").to_csv(index=False).encode())
    log.info("attributes from %s: %s (%d images)", labels_csv, list(attrs.columns[1:]), len(attrs))
    return len(attrs.columns) - 1


def read_attributes(storage: Storage, dataset_id: str) -> pd.DataFrame | None:
    if not storage.exists(attributes_key(dataset_id)):
        return None
    return pd.read_csv(io.BytesIO(storage.get_bytes(attributes_key(dataset_id))), dtype=str, keep_default_na=False)
