"""CSV that a person may open in a spreadsheet, without formulas smuggled in from the data.

A spreadsheet runs a cell that starts with `=`, `+`, `-` or `@` as a formula (and a leading tab or
carriage return can hide one), so a labels.csv value or a file name such as `=HYPERLINK(...)` copied
verbatim into an output would run on the reader's machine ("CSV injection"). `to_csv` writes a text
cell that starts with one of them with a single quote before it, as OWASP recommends, which
spreadsheets show as text; numbers (a float column's -0.5) stay numbers. Column names are treated
the same way (labels.csv's header names attribute columns).

`read_csv` undoes exactly that, so a table the pipeline writes and reads back (a manifest, the
attributes) comes back as it was. The quote is added to any run of quotes before such a character
too ("'=x" is written "''=x"), which keeps the round trip lossless for every text value.
"""

from __future__ import annotations

import re
from typing import Any

import pandas as pd

# A text cell that a spreadsheet would read as a formula: these first characters, after any quotes.
FORMULA_START = re.compile(r"'*[=+\-@\t\r]")


def neutralise(value: Any) -> Any:
    """`value` with a single quote before it if it is text a spreadsheet would run as a formula."""
    return "'" + value if isinstance(value, str) and FORMULA_START.match(value) else value


def restore(value: Any) -> Any:
    """The text `neutralise` was given (its quote removed); anything else as it is."""
    if isinstance(value, str) and value.startswith("'") and FORMULA_START.match(value, 1):
        return value[1:]
    return value


def _map_text(frame: pd.DataFrame, cell) -> pd.DataFrame:
    out = frame.copy(deep=False)
    for i in range(frame.shape[1]):
        values = frame.iloc[:, i]
        if values.dtype == object or pd.api.types.is_string_dtype(values.dtype):
            out.isetitem(i, pd.Series([cell(v) for v in values], index=frame.index, dtype=values.dtype))
    out.columns = [cell(c) for c in frame.columns]
    return out


def to_csv(frame: pd.DataFrame, path_or_buf=None, **kwargs) -> str | None:
    """`frame.to_csv(path_or_buf, **kwargs)` with its text cells neutralised (the frame is not changed)."""
    if kwargs.get("index", True) and frame.index.dtype == object:
        frame = frame.set_axis([neutralise(v) for v in frame.index], axis=0)
    return _map_text(frame, neutralise).to_csv(path_or_buf, **kwargs)


def read_csv(source, **kwargs) -> pd.DataFrame:
    """`pandas.read_csv(source, **kwargs)` of a table `to_csv` wrote, its text cells as they were."""
    return _map_text(pd.read_csv(source, **kwargs), restore)
