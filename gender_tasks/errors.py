"""The package's error base: problems a retry cannot fix (bad settings, bad data, a missing source).

The DAG turns these into failures without retries; anything else (a network blip, a lost worker)
is retried as Airflow's `retries` say.
"""

import re


class PermanentError(ValueError):
    """Bad input or configuration; the message names the bad item and the fix."""


_BUFFER_REPR = re.compile(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def decode_failure(exc: BaseException) -> str:
    """Why an image did not decode, for a message or a table: the exception's type and text, without the
    in-memory buffer Pillow names (`cannot identify image file <_io.BytesIO object at 0x7f…>`), an address
    that says nothing about the file. At most 300 characters. (Here, not in data/images.py: that file's
    source is part of every train key, and a message is no reason to retrain.)"""
    text = _BUFFER_REPR.sub("", str(exc)).strip()
    return (f"{type(exc).__name__}: {text}" if text else type(exc).__name__)[:300]
