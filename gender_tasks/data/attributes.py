"""Extra per-image attributes (age, ethnicity, …) from a source's optional `labels.csv`.

A source folder may carry a `labels.csv` with a `file` column (path relative to the folder) and
attribute columns. They are kept beside the dataset, keyed by content, for per-group accuracy:

    datasets/<dataset_id>/attributes.csv   sha256, <attribute>...   (categorical; numbers binned)

The file is read and judged (`load_labels`) before ingest writes anything: text that is not UTF-8
or rows with the wrong number of fields are refused naming the file, the line and the fix.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .. import tables
from ..errors import PermanentError
from ..layout import attributes_key
from ..storage import Storage, get_recorded, put_recorded
from .folders import find_class_dirs, read_regular, shown

MAX_LABELS_BYTES = 200_000_000

log = logging.getLogger(__name__)

# Columns that describe the file or the label, not the person.
NOT_ATTRIBUTES = {"file", "label", "width", "height", "source_path", "source_zip", "zip_blob", "zip_member",
                  "categories", "gp_confidence", "sha256", "key", "bytes", "format"}  # fmt: skip
MAX_GROUPS = 12


def find_labels_csv(root: Path) -> Path | None:
    """`labels.csv` beside the class folders (which may sit one wrapping folder down)."""
    dataset_root = next(iter(find_class_dirs(root, say_skipped=False).values())).parent
    for folder in (dataset_root, root):
        if (folder / "labels.csv").is_file():
            return folder / "labels.csv"
    return None


class LabelsError(PermanentError):
    """A labels.csv cannot be parsed; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class Labels:
    path: Path
    table: pd.DataFrame


def _text(path: Path, root: Path) -> str:
    """The file as UTF-8 text (a BOM allowed); anything else is refused with the line it breaks on."""
    if not Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root)):
        raise LabelsError(f"{shown(path)} is a symbolic link to {shown(os.path.realpath(path))}, outside the source: "
                          "copy the file in instead")  # fmt: skip
    try:
        data = read_regular(path, MAX_LABELS_BYTES)
    except OSError as exc:
        raise LabelsError(f"{shown(path)} cannot be read ({exc.strerror or exc}): fix or remove it") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise LabelsError(
            f"{shown(path)} line {line} is not UTF-8 (byte 0x{data[exc.start]:02x}): re-save it as UTF-8, e.g. "
            f"`iconv -f latin1 -t utf-8 labels.csv > utf8.csv && mv utf8.csv labels.csv`"
        ) from None


def read_labels_table(path: Path, root: Path | None = None, *, as_text: bool = False) -> pd.DataFrame:
    """A labels.csv as a table, every row checked against the header first (pandas would fill short
    rows with NaN silently, and name long ones only in a C-parser message). A link leaving `root`
    (default: the file's folder) is refused. `as_text`: every cell as written (str, empty cells ""),
    no type inference."""
    text = _text(path, root or path.parent)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, [])
        for row in reader:
            if row and len(row) != len(header):
                raise LabelsError(
                    f"{shown(path)} line {reader.line_num} has {len(row)} fields, the header has {len(header)}: "
                    "fix that row (a comma inside a value needs quotes)"
                )
    except csv.Error as exc:
        raise LabelsError(
            f"{shown(path)} line {reader.line_num} cannot be parsed as CSV ({exc}): fix that row"
        ) from None
    if as_text:
        return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    return pd.read_csv(io.StringIO(text))


def load_labels(root: Path) -> Labels | None:
    """The source's labels.csv, parsed and checked, or None where it has none."""
    path = find_labels_csv(root)
    return None if path is None else Labels(path, read_labels_table(path, root))


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


def store_attributes(labels: Labels | None, root: Path, storage: Storage, dataset_id: str,
                     manifest: pd.DataFrame) -> int:  # fmt: skip
    """Save the attributes of the dataset's images from its `load_labels` (None: nothing to save);
    returns the number of attribute columns kept."""
    if labels is None:
        return 0
    labels_csv, table = labels.path, labels.table
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
    put_recorded(
        storage, attributes_key(dataset_id), tables.to_csv(attrs.drop_duplicates("sha256"), index=False).encode()
    )
    log.info("attributes from %s: %s (%d images)", labels_csv, list(attrs.columns[1:]), len(attrs))
    return len(attrs.columns) - 1


def read_attributes(storage: Storage, dataset_id: str) -> pd.DataFrame | None:
    if not storage.exists(attributes_key(dataset_id)):
        return None
    return tables.read_csv(
        io.BytesIO(get_recorded(storage, attributes_key(dataset_id))), dtype=str, keep_default_na=False
    )
