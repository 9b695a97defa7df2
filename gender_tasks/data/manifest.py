"""The manifest: one row per image of a dataset (CSV in object storage), and how it is read back.

Columns: key (storage key of the image), label, sha256, bytes, width, height, format, decodable,
error (why it does not decode), source_path (relative to the source root), phash (64-bit perceptual
hash, hex). A split manifest adds `split` (train / val / test).

Manifests are written with their sha256 recorded beside them (storage.put_recorded) and checked when
read back. A dataset's own manifest is also content-addressed: its dataset id is the hash of its
images' (sha256, label) pairs, and every image key names its content, so `check_rows` finds an edited
label, hash or key even where no checksum was recorded.
"""

from __future__ import annotations

import hashlib
import io

import pandas as pd

from .. import layout, tables
from ..integrity import IntegrityError, repair_hint, verify_bytes
from ..storage import Storage, get_recorded, put_recorded

MANIFEST_COLUMNS = [
    "key", "label", "sha256", "bytes", "width", "height", "format", "decodable", "error", "source_path", "phash",
]  # fmt: skip
# Text columns, read back as text (a hash of digits only must not turn into a number).
TEXT_COLUMNS = ("key", "label", "sha256", "format", "error", "source_path", "phash")


def decodable_mask(manifest: pd.DataFrame) -> pd.Series:
    """Which rows decode: `decodable` as booleans, whether the frame holds bools or their text."""
    return manifest["decodable"].astype(str).str.lower().eq("true")


def dataset_id_of(pairs) -> str:
    """The dataset id of images given as (sha256, label) pairs: the same content always gets the same id."""
    digest = hashlib.sha256()
    for sha, label in sorted(pairs):
        digest.update(f"{sha} {label}\n".encode())
    return "ds-" + digest.hexdigest()[:16]


def check_rows(storage: Storage, key: str, manifest: pd.DataFrame, dataset_id: str) -> None:
    """Refuse a manifest (or split) of `dataset_id` whose rows are not that dataset's: an edited label or
    hash changes the id its (sha256, label) pairs hash to, and every key must name its row's content."""
    found = dataset_id_of(zip(manifest["sha256"], manifest["label"], strict=True))
    fix = repair_hint(storage.uri)
    if found != dataset_id:
        raise IntegrityError(
            f"{storage.url(key)} is corrupt: its images and labels hash to dataset id {found}, not {dataset_id} "
            f"(a label or image hash was changed in storage). {fix}"
        )
    expected = [layout.image_key(dataset_id, label, sha, path) for label, sha, path in
                zip(manifest["label"], manifest["sha256"], manifest["source_path"], strict=True)]  # fmt: skip
    bad = manifest["key"].ne(pd.Series(expected, index=manifest.index))
    if bad.any():
        row = manifest[bad].iloc[0]
        raise IntegrityError(
            f"{storage.url(key)} is corrupt: the row of {row['source_path']!r} names the image key "
            f"{row['key']!r}, which is not its content's ({sum(bad)} such row(s)). {fix}"
        )


def read_manifest(
    storage: Storage, key: str, sha256: str | None = None, *, dataset_id: str | None = None
) -> pd.DataFrame:
    """A manifest or split, checked against `sha256` (from the run record) or the checksum recorded beside it,
    and, given its `dataset_id`, against the dataset's content address (check_rows)."""
    manifest = parse_manifest(get_recorded(storage, key, sha256))
    if dataset_id is not None:
        check_rows(storage, key, manifest, dataset_id)
    return manifest


def parse_manifest(data: bytes) -> pd.DataFrame:
    return tables.read_csv(io.BytesIO(data), keep_default_na=False, dtype=dict.fromkeys(TEXT_COLUMNS, str))


def write_manifest(storage: Storage, key: str, manifest: pd.DataFrame) -> str:
    """Write a manifest or split with its sha256 recorded beside it; returns the sha256."""
    return put_recorded(storage, key, tables.to_csv(manifest, index=False).encode())


def read_image(storage: Storage, key: str) -> bytes:
    """A stored image's bytes, checked against the sha256 its key names (content addressing)."""
    data = storage.get_bytes(key)
    sha = layout.image_sha(key)
    if sha is None:  # not a dataset image key (an image stored by hand): nothing names its content
        return data
    return verify_bytes(data, sha, what=f"the image {storage.url(key)}", fix=repair_hint(storage.uri))
