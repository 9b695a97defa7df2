"""Read-only access to finished reports, for the Airflow UI plugin.

A run id is mapped to a storage key by `pipeline.run_key_for` (letters, digits, '.', '_' and '-'
only) and the key is checked again by the storage layer, so a request can only ever name
`runs/<run key>/report.html` inside the configured storage.
"""

from __future__ import annotations

import html
import re

from .pipeline import run_key_for
from .report import report_key
from .storage import StorageError, open_storage

_SAFE_RUN_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ReportNotFound(LookupError):
    pass


def read_report(run_id: str, storage_uri: str | None = None) -> str:
    run_key = run_key_for(run_id)
    if not _SAFE_RUN_KEY.fullmatch(run_key) or ".." in run_key:
        raise ReportNotFound(f"no report for run {run_id!r}")
    storage = open_storage(storage_uri)
    try:
        return storage.get_bytes(report_key(run_key)).decode("utf-8")
    except (FileNotFoundError, StorageError):
        raise ReportNotFound(f"no report for run {run_id!r} (has its report task finished?)") from None


def list_reports(storage_uri: str | None = None) -> list[str]:
    storage = open_storage(storage_uri)
    return sorted(
        (k.split("/")[1] for k in storage.list("runs/") if k.endswith("/report.html") and k.count("/") == 2),
        reverse=True,
    )


def render_index(url_prefix: str, storage_uri: str | None = None) -> str:
    items = "".join(
        f'<li><a href="{html.escape(url_prefix)}/runs/{html.escape(k)}">{html.escape(k)}</a></li>'
        for k in list_reports(storage_uri)
    )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Gender classification reports</title></head>"
        f"<body style='font-family:system-ui;margin:2em'><h1>Comparison reports</h1><ul>{items or '<li>none yet</li>'}"
        "</ul></body></html>"
    )
