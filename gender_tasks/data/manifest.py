"""The manifest: one row per image of a dataset (CSV in object storage), and how it is read back.

Columns: key (storage key of the image), label, sha256, bytes, width, height, format, decodable,
error (why it does not decode), source_path (relative to the source root), phash (64-bit perceptual
hash, hex). A split manifest adds `split` (train / val / test).
"""

from __future__ import annotations

import io

import pandas as pd

from .. import tables
from ..storage import Storage

MANIFEST_COLUMNS = [
    "key", "label", "sha256", "bytes", "width", "height", "format", "decodable", "error", "source_path", "phash",
]  # fmt: skip
# Text columns, read back as text (a hash of digits only must not turn into a number).
TEXT_COLUMNS = ("key", "label", "sha256", "format", "error", "source_path", "phash")


def decodable_mask(manifest: pd.DataFrame) -> pd.Series:
    """Which rows decode: `decodable` as booleans, whether the frame holds bools or their text."""
    return manifest["decodable"].astype(str).str.lower().eq("true")


def read_manifest(storage: Storage, key: str) -> pd.DataFrame:
    return tables.read_csv(io.BytesIO(storage.get_bytes(key)), keep_default_na=False,
                       dtype=dict.fromkeys(TEXT_COLUMNS, str))  # fmt: skip


def write_manifest(storage: Storage, key: str, manifest: pd.DataFrame) -> None:
    storage.put_bytes(key, tables.to_csv(manifest, index=False).encode())
