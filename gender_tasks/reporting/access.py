"""Read-only access to finished reports, for the Airflow UI plugin.

Imports only the storage layout and the storage interface (no torch, pandas or scikit-learn), so the
API server serves a report without loading the training stack. A run id is mapped to a storage key by
`layout.run_key_for` (letters, digits, '.', '_' and '-' only) and the key is checked again by the
storage layer, so a request can only ever name `runs/<run key>/report.html` inside the storage.
"""

from __future__ import annotations

import html

from .. import layout
from ..storage import StorageError, open_storage


class ReportNotFound(LookupError):
    pass


def read_report(run_id: str, storage_uri: str | None = None) -> str:
    run_key = layout.run_key_for(run_id)
    if not layout.SAFE_RUN_KEY.fullmatch(run_key) or ".." in run_key:
        raise ReportNotFound(f"no report for run {run_id!r}")
    storage = open_storage(storage_uri)
    try:
        return storage.get_bytes(layout.report_key(run_key)).decode("utf-8")
    except (FileNotFoundError, StorageError):
        raise ReportNotFound(f"no report for run {run_id!r} (has its report task finished?)") from None


def list_reports(storage_uri: str | None = None) -> list[str]:
    return layout.report_run_keys(open_storage(storage_uri).list(f"{layout.RUNS}/"))


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
