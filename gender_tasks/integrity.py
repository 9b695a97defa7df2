"""Checksums of stored bytes, checked on read: corruption is found when bytes are used, not by luck.

Every object the pipeline reads back is either content-addressed (an image's key holds its sha256) or
has a sha256 recorded by whoever wrote it (a shard in its cache index, a manifest in the run record, a
model's files in its model card, a checkpoint in its sidecar). Readers pass that checksum to
`verify_bytes` (or `storage.read_verified`); a mismatch is an IntegrityError: permanent (a retry reads
the same bad bytes), naming the object and how to repair it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .errors import PermanentError

# What every integrity error tells the user to do.
REPAIR_HINT = (
    "run `python -m gender_tasks verify --storage {storage} --repair` to remove the bad object(s), then rerun: "
    "the run rebuilds what was removed"
)
_CHUNK = 1 << 20


class IntegrityError(PermanentError):
    """Stored bytes do not match the checksum recorded when they were written; the message names the object."""


class NotARegularFile(IntegrityError):
    """Where an object of local storage should be, something that is no plain file: a FIFO (a read would wait
    for a writer forever), a device (a read never ends) or a socket. `why` says which, for verify's line."""

    def __init__(self, message: str, why: str):
        super().__init__(message)
        self.why = why


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file, read in 1 MiB chunks (never whole into memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def repair_hint(storage_uri: str) -> str:
    return REPAIR_HINT.format(storage=storage_uri)


def mismatch(what: str, expected: str, actual: str, fix: str) -> IntegrityError:
    """The error for bytes whose sha256 is `actual` where `expected` was recorded; `what` names them."""
    return IntegrityError(
        f"{what} is corrupt: its sha256 is {actual[:16]}..., not the {expected[:16]}... recorded when it was "
        f"written (changed or damaged in storage since). {fix}"
    )


def verify_bytes(data: bytes, expected: str, *, what: str, fix: str) -> bytes:
    """`data` if its sha256 is `expected`; else an IntegrityError naming `what`, with `fix`."""
    actual = sha256_hex(data)
    if actual != expected:
        raise mismatch(what, expected, actual, fix)
    return data
