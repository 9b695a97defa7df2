"""Read-only access to reports, and the small pages the Airflow UI plugin answers with.

Imports only the storage layout, the storage interface and the standard library (no torch, pandas or
scikit-learn), so the API server serves a report without loading the training stack. A run's report
is found through its run record (what `pipeline.prepare` returned: the storage and the report's key),
so a run on any storage shows its report; runs without a record fall back to the default storage.
A run id is mapped to a storage key by `layout.run_key_for` (letters, digits, '.', '_' and '-' only)
and the key is checked again by the storage layer, so a request can only ever name
`runs/<run key>/report.html` inside a storage.

Airflow is not imported here: the plugin looks the run up in Airflow's database and passes in what
it found (`RunView`).
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from datetime import datetime

from .. import layout
from ..storage import StorageError, open_storage

# Reports and the list are data-derived HTML served on the API's origin: nothing in them may run,
# load, submit or re-base anything. Inline styles and data: images are all today's report needs.
STRICT_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'none'; base-uri 'none'; "
    "frame-ancestors 'self'; sandbox"
)
# The list links to runs and reports: it may open them in a new tab (a popup that leaves the sandbox),
# since inside Airflow's iframe a link would otherwise load the whole UI in the frame. Nothing else is relaxed.
LIST_CSP = f"{STRICT_CSP} allow-popups allow-popups-to-escape-sandbox"
# Longest run key a storage folder name can hold (file systems allow 255 bytes per name).
MAX_RUN_KEY = 200


class ReportNotFound(LookupError):
    pass


@dataclass
class RunView:
    """One DAG run as the plugin found it in Airflow's database."""

    run_id: str
    state: str
    record: dict | None = None  # the run record (prepare's XCom, or a later step's with the dataset)
    failed_tasks: list[str] = field(default_factory=list)
    started: datetime | None = None
    ended: datetime | None = None

    @property
    def storage_uri(self) -> str | None:
        return (self.record or {}).get("storage")

    @property
    def run_key(self) -> str:
        return (self.record or {}).get("run_key") or layout.run_key_for(self.run_id)


def _safe_run_key(run_key: str, run_id: str) -> str:
    if len(run_key) > MAX_RUN_KEY or not layout.SAFE_RUN_KEY.fullmatch(run_key) or ".." in run_key:
        raise ReportNotFound(f"no report for run {run_id!r}")
    return run_key


def read_report(run_id: str, storage_uri: str | None = None, run_key: str | None = None) -> str:
    run_key = _safe_run_key(run_key or layout.run_key_for(run_id), run_id)
    try:
        return open_storage(storage_uri).get_bytes(layout.report_key(run_key)).decode("utf-8")
    except (OSError, StorageError):  # FileNotFoundError and names the file system refuses
        raise ReportNotFound(f"no report for run {run_id!r} (has its report task finished?)") from None


def read_results(run: RunView) -> dict | None:
    """The run's results.json, or None when it has none (yet)."""
    try:
        key = layout.results_key(_safe_run_key(run.run_key, run.run_id))
        return json.loads(open_storage(run.storage_uri).get_bytes(key))
    except (OSError, StorageError, ReportNotFound, ValueError):
        return None


def answer(run_id: str, run: RunView | None) -> tuple[int, str]:
    """The report tab's answer (HTTP status, page) for a run as found in Airflow's database (None: no such
    run there, e.g. a database reset since: its report is looked for in the default storage)."""
    try:
        if run is None:
            return 200, read_report(run_id)
        return 200, read_report(run.run_id, run.storage_uri, run.run_key)
    except ReportNotFound:
        pass
    if run is None:
        return 404, not_found_page(run_id)
    # The run exists: a page that says where it stands (200), not an error.
    if run.state == "failed" or run.failed_tasks:
        return 200, failed_page(run)
    if run.state == "success":  # finished, but its report is gone (its storage was cleaned up)
        return 404, not_found_page(run_id)
    return 200, not_ready_page(run)


# --- pages -------------------------------------------------------------------------------------------

_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse}"
    "td,th{border-bottom:1px solid #ddd;padding:.35em .7em;text-align:left;vertical-align:top}"
    "th{background:#f4f4f4}.muted{color:#666}.state{font-weight:600}.failed{color:#b00020}"
    ".success{color:#16794c}.num{text-align:right;font-variant-numeric:tabular-nums}"
)


def page(title: str, body: str) -> str:
    """A small self-contained page (inline style only, nothing to load)."""
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )


def not_ready_page(run: RunView) -> str:
    return page(
        "Report not ready yet",
        f"<p>Run <code>{html.escape(run.run_id)}</code> is <span class='state'>{html.escape(run.state)}</span>. "
        "Its comparison report appears here when the <code>report</code> task has finished; reload this tab "
        "then.</p>",
    )


def failed_page(run: RunView) -> str:
    tasks = ", ".join(f"<code>{html.escape(t)}</code>" for t in run.failed_tasks) or "none recorded"
    return page(
        "No report: the run failed",
        f"<p>Run <code>{html.escape(run.run_id)}</code> ended <span class='state failed'>{html.escape(run.state)}"
        f"</span> before its report was written. Failed task(s): {tasks}. The task's log (Grid view, the red "
        "square) says why and how to fix it.</p>",
    )


def not_found_page(run_id: str) -> str:
    shown = run_id if len(run_id) <= 80 else run_id[:80] + "…"
    return page(
        "Report not found",
        f"<p>There is no run <code>{html.escape(shown)}</code> of this DAG with a report. "
        "<em>Browse → Gender classification reports</em> lists the runs there are.</p>",
    )


def _fmt_duration(run: RunView) -> str:
    if not (run.started and run.ended):
        return ""
    seconds = int((run.ended - run.started).total_seconds())
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def _row(run: RunView, results: dict | None, ui_run_url: str, report_url: str) -> str:
    settings = (run.record or {}).get("settings") or (results or {}).get("settings") or {}
    dataset = (run.record or {}).get("dataset") or (results or {}).get("dataset") or {}
    accuracy = {r["model"]: r["ours"]["test_accuracy"] for r in (results or {}).get("table", [])}
    best = max(accuracy, key=accuracy.get) if accuracy else ""
    acc_cells = "<br>".join(f"{html.escape(m)} {a:.3f}" for m, a in accuracy.items())
    dataset_text = (
        f"<code>{html.escape(str(dataset.get('dataset_id', ''))[:12])}</code> ({dataset.get('images', '?')} images)"
        if dataset
        else ""
    )
    when = run.started.strftime("%Y-%m-%d %H:%M UTC") if run.started else ""
    report_link = f"<a href='{html.escape(report_url)}' target='_blank' rel='noopener'>report</a>" if results else ""
    return (
        f"<tr><td><a href='{html.escape(ui_run_url)}' target='_blank' rel='noopener'>{html.escape(run.run_id)}</a>"
        f"</td><td>{when}</td>"
        f"<td class='state {html.escape(run.state)}'>{html.escape(run.state)}</td>"
        f"<td>{html.escape(str(settings.get('profile', '')))}</td><td>{dataset_text}</td>"
        f"<td class='num'>{acc_cells}</td><td>{html.escape(best)}</td><td class='num'>{_fmt_duration(run)}</td>"
        f"<td>{report_link}</td></tr>"
    )


def render_index(runs: list[RunView], url_prefix: str, dag_id: str) -> str:
    """The reports list: one row per run, newest first, with links to the run and its report (full page)."""
    from urllib.parse import quote

    rows = "".join(
        _row(
            run,
            read_results(run),
            f"/dags/{quote(dag_id)}/runs/{quote(run.run_id, safe='')}",
            f"{url_prefix}/runs/{quote(run.run_id, safe='')}",
        )  # fmt: skip
        for run in runs
    )
    head = "".join(
        f"<th>{h}</th>"
        for h in ("Run", "Started", "State", "Profile", "Dataset", "Test accuracy", "Best model", "Duration", "")
    )
    body = (
        f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
        if runs
        else "<p class='muted'>No runs yet: trigger the DAG <code>gender_classification</code>.</p>"
    )
    return page("Gender classification reports", body)
