"""Read-only access to reports, and the small pages the Airflow UI plugin answers with.

Imports only the storage layout, the storage interface and the standard library (no torch, pandas or
scikit-learn), so the API server serves a report without loading the training stack. A run's report
is found through its run record (what `pipeline.prepare` returned: the storage and the report's key),
so a run on any storage shows its report; runs without a record fall back to the default storage.
A run id is mapped to a storage key by `layout.run_key_for` (letters, digits, '.', '_' and '-' only)
and the key is checked again by the storage layer, so a request can only ever name
`runs/<run key>/report.html` inside a storage.

Airflow is not imported here: the plugin looks the run up in Airflow's database and passes in what
it found (`RunView`, with its tasks and the message each failed step recorded).

Downloads name a file relative to the run's folder ("results.json", "models/cnn/predictions.csv"); only
names found by listing that folder, among the kinds offered (`downloads`), are served, so a request cannot
reach anything else. Comparisons read each run's results.json and, for the paired test, the models'
test predictions (plain csv; the exact McNemar test is a few lines of `math.comb`, since this module may
not import scipy).
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from urllib.parse import quote, urlencode

from .. import layout
from ..integrity import IntegrityError
from ..storage import StorageError, get_recorded, open_storage

# Reports and the list are data-derived HTML served on the API's origin: nothing in them may run,
# load, submit or re-base anything. Inline styles and data: images are all today's report needs.
STRICT_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'none'; base-uri 'none'; "
    "frame-ancestors 'self'; sandbox"
)
# Reports and the list link to runs, logs and files: a link may be opened in a new tab (a popup that leaves
# the sandbox) where the page is not framed by Airflow, and files may download (a sandboxed document
# cannot, unless allowed).
REPORT_CSP = f"{STRICT_CSP} allow-popups allow-popups-to-escape-sandbox allow-downloads"
# The list also submits its one form (the runs to compare, a GET to this app).
LIST_CSP = REPORT_CSP.replace("form-action 'none'", "form-action 'self'") + " allow-forms"
# Downloads are attachments: nothing in them renders, let alone runs.
DOWNLOAD_CSP = "default-src 'none'; sandbox"
# Longest run key a storage folder name can hold (file systems allow 255 bytes per name).
MAX_RUN_KEY = 200


class ReportNotFound(LookupError):
    pass


@dataclass
class TaskView:
    """One task instance of a run: what the pages say about it and link to."""

    task_id: str
    map_index: int = -1
    label: str | None = None  # a mapped task's rendered index: the model ("cnn", "cnn #2")
    state: str | None = None
    error: str | None = None  # the message the failing step recorded (the DAG's `failure` XCom), no traceback

    @property
    def name(self) -> str:
        if self.map_index < 0:
            return self.task_id
        return f"{self.task_id} [{self.label if self.label else self.map_index}]"


@dataclass
class RunView:
    """One DAG run as the plugin found it in Airflow's database."""

    run_id: str
    state: str
    record: dict | None = None  # the run record (prepare's XCom, or a later step's with the dataset)
    failed_tasks: list[str] = field(default_factory=list)
    started: datetime | None = None
    ended: datetime | None = None
    tasks: list[TaskView] = field(default_factory=list)
    dag_id: str = "gender_classification"

    @property
    def failed(self) -> list[TaskView]:
        return [t for t in self.tasks if t.state == "failed"]

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


def answer(run_id: str, run: RunView | None, url_prefix: str = "/gender-reports") -> tuple[int, str]:
    """The report tab's answer (HTTP status, page) for a run as found in Airflow's database (None: no such
    run there, e.g. a database reset since: its report is looked for in the default storage). A report
    served for a run known to Airflow carries a bar with its links and downloads (`decorate_report`)."""
    try:
        if run is None:
            return 200, read_report(run_id)
        return 200, decorate_report(read_report(run.run_id, run.storage_uri, run.run_key), run, url_prefix)
    except ReportNotFound:
        pass
    if run is None:
        return 404, not_found_page(run_id)
    # The run exists: a page that says where it stands (200), not an error.
    if run.state == "failed" or run.failed_tasks or run.failed:
        return 200, failed_page(run)
    if run.state == "success":  # finished, but its report is gone (its storage was cleaned up)
        return 404, not_found_page(run_id)
    return 200, not_ready_page(run)


# --- links ------------------------------------------------------------------------------------------


def grid_url(run: RunView) -> str:
    """The run in Airflow's UI (its grid and task list)."""
    return f"/dags/{quote(run.dag_id, safe='')}/runs/{quote(run.run_id, safe='')}"


def log_url(run: RunView, task: TaskView) -> str:
    """A task instance's page in Airflow's UI, which opens on its log."""
    mapped = f"/mapped/{task.map_index}" if task.map_index >= 0 else ""
    return f"{grid_url(run)}/tasks/{quote(task.task_id, safe='')}{mapped}"


def download_url(url_prefix: str, run_id: str, name: str) -> str:
    return f"{url_prefix}/download?{urlencode({'run': run_id, 'file': name})}"


def report_url(url_prefix: str, run_id: str) -> str:
    return f"{url_prefix}/runs/{quote(run_id, safe='')}"


def _a(href: str, text: str, *, download: bool = False) -> str:
    """A link that opens in the same frame. Airflow frames a plugin's page with `sandbox="allow-scripts
    allow-same-origin allow-forms allow-downloads"`: no popups, no top-level navigation, so a new-tab or
    `_top` link would do nothing there; a plain link works in the frame and on a page of its own."""
    return f"<a href='{html.escape(href)}'{' download' if download else ''}>{html.escape(text)}</a>"


def training_task(run: RunView, model: str) -> TaskView | None:
    """The task that made `model` in this run: its mapped `train` instance (repeat 0), or `ensemble`."""
    if model == "ensemble":
        return next((t for t in run.tasks if t.task_id == "ensemble"), None)
    return next((t for t in run.tasks if t.task_id == "train" and t.label == model), None)


# --- failures ---------------------------------------------------------------------------------------


def failure_html(run: RunView) -> str:
    """Why a run failed, where users look: each failed task, its own message (the cause and the fix, no
    traceback) and a link to its log; a run failed with no failed task was stopped by hand or timed out."""
    items = []
    for task in run.failed:
        message = (
            f"<pre class='error'>{html.escape(task.error)}</pre>"
            if task.error
            else "<p class='muted'>No message recorded: the task was killed, ran past its time-out or was "
            "marked failed by hand. Its log says more.</p>"
        )
        items.append(f"<li data-failed-task='{html.escape(task.task_id)}'><b>{html.escape(task.name)}</b> "
                     f"({_a(log_url(run, task), 'its log')}){message}</li>")  # fmt: skip
    known = {t.task_id for t in run.failed}
    for name in sorted(set(run.failed_tasks) - known):  # a failed task the plugin saw without its details
        items.append(f"<li data-failed-task='{html.escape(name)}'><b>{html.escape(name)}</b></li>")
    if items:
        return f"<ul class='failures'>{''.join(items)}</ul>"
    if run.state == "failed":
        return (
            "<p class='failures'>No task failed: the run was marked failed by hand, or ran past its time-out, "
            f"before its tasks finished. {_a(grid_url(run), 'Open the run in the grid')} to see which tasks did "
            "not run.</p>"
        )
    return ""


def failure_summary(run: RunView, limit: int = 240) -> str:
    """One line for the reports list: the first failed task and the start of its message, with its log."""
    failed = run.failed
    if not failed:
        return "marked failed by hand or timed out: no task failed" if run.state == "failed" else ""
    task = failed[0]
    message = task.error or "no message recorded: see its log"
    if len(message) > limit:
        message = message[:limit] + "…"
    more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
    return (f"<div class='why' data-failed-task='{html.escape(task.task_id)}'><b>{html.escape(task.name)}</b>{more}: "
            f"<span class='error'>{html.escape(message)}</span> {_a(log_url(run, task), 'log')}</div>")  # fmt: skip


# --- pages ------------------------------------------------------------------------------------------

_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:1.2em;color:#222;max-width:100%}"
    "table{border-collapse:collapse}"
    "td,th{border-bottom:1px solid #ddd;padding:.35em .7em;text-align:left;vertical-align:top}"
    "th{background:#f4f4f4}.muted{color:#666}.state{font-weight:600}.failed{color:#b00020}"
    ".success{color:#16794c}.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}"
    ".scroll{overflow-x:auto;max-width:100%}code,.error{overflow-wrap:anywhere}"
    "pre.error{white-space:pre-wrap;background:#fff2f2;border-left:4px solid #b00020;padding:.4em .7em;margin:.3em 0}"
    ".why{font-size:.9em;margin-top:.3em;max-width:36em}.pos{color:#116b2f}.neg{color:#a4161a}"
    "ul.files{padding-left:1.2em}h1{font-size:1.5em}"
)


def page(title: str, body: str) -> str:
    """A small self-contained page (inline style only, nothing to load), readable on a phone."""
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )


def not_ready_page(run: RunView) -> str:
    return page(
        "Report not ready yet",
        f"<p>Run <code>{html.escape(run.run_id)}</code> is <span class='state'>{html.escape(run.state)}</span>. "
        "Its comparison report appears here when the <code>report</code> task has finished; reload this tab "
        f"then. {_a(grid_url(run), 'The run in the grid')}.</p>",
    )


def failed_page(run: RunView) -> str:
    return page(
        "No report: the run failed",
        f"<p>Run <code>{html.escape(run.run_id)}</code> ended <span class='state failed'>{html.escape(run.state)}"
        f"</span> before its report was written ({_a(grid_url(run), 'the run in the grid')}).</p>"
        f"<h2>Why</h2>{failure_html(run)}",
    )


def not_found_page(run_id: str) -> str:
    shown = run_id if len(run_id) <= 80 else run_id[:80] + "…"
    return page(
        "Report not found",
        f"<p>There is no run <code>{html.escape(shown)}</code> of this DAG with a report. "
        "<em>Browse → Gender classification reports</em> lists the runs there are.</p>",
    )


# --- downloads --------------------------------------------------------------------------------------

RUN_FILES = ("results.json", "report.html", "label_audit.csv")


def downloads(run: RunView) -> list[str]:
    """The files of a run offered for download, relative to its folder: results.json, the report,
    label_audit.csv, and each model's outputs (layout.MODEL_OUTPUTS: predictions, metrics, the model
    files and card), as far as the run's folder holds them."""
    try:
        run_key = _safe_run_key(run.run_key, run.run_id)
        prefix = layout.run_prefix(run_key) + "/"
        keys = open_storage(run.storage_uri).list(prefix)
    except (OSError, StorageError, ReportNotFound):
        return []
    names = [k[len(prefix) :] for k in keys]
    out = [n for n in RUN_FILES if n in names]
    models = sorted({n.split("/")[1] for n in names if n.startswith("models/") and n.count("/") == 2})
    for model in models:
        out += [f"models/{model}/{f}" for f in layout.MODEL_OUTPUTS if f"models/{model}/{f}" in names]
    return out


class DownloadError(LookupError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def read_download(run: RunView, name: str) -> tuple[bytes, str, str]:
    """(bytes, file name to save as, media type) of one of `downloads(run)`; checked against its recorded
    sha256 where one exists (a model's card records its files; other objects their .sha256)."""
    if name not in downloads(run):
        raise DownloadError(404, f"run {run.run_id!r} has no file {name!r} to download")
    storage = open_storage(run.storage_uri)
    run_key = _safe_run_key(run.run_key, run.run_id)
    key = f"{layout.run_prefix(run_key)}/{name}"
    expected = None
    parts = name.split("/")
    if parts[0] == "models" and parts[2] != "model_card.json":
        try:
            card = json.loads(storage.get_bytes(layout.model_file_key(run_key, parts[1], "model_card.json")))
            expected = (card.get("files") or {}).get(parts[2])
        except (OSError, StorageError, ValueError):
            expected = None
    try:
        data = get_recorded(storage, key, expected)
    except IntegrityError as exc:
        raise DownloadError(500, f"{name} of run {run.run_id!r} does not match its recorded checksum: {exc}") from exc
    except (OSError, StorageError) as exc:
        raise DownloadError(404, f"{name} of run {run.run_id!r} could not be read: {exc}") from exc
    media = {".json": "application/json", ".csv": "text/csv", ".html": "text/html"}.get(
        "." + name.rpartition(".")[2], "application/octet-stream"
    )
    return data, f"{run_key}-{name.replace('/', '-')}", media


def _file_label(name: str) -> str:
    return name.removeprefix("models/").replace("/", " · ")


def decorate_report(report: str, run: RunView, url_prefix: str) -> str:
    """The stored report, served with what only the server knows: a bar linking to the run in the grid,
    the downloads, and each model's training log (in the model's Table 1 row, where the report left a
    `<!--model-links:<model>-->` marker)."""
    files = downloads(run)
    by_model: dict[str, list[str]] = {}
    for name in files:
        if name.startswith("models/"):
            by_model.setdefault(name.split("/")[1], []).append(name)
    run_files = " · ".join(_a(download_url(url_prefix, run.run_id, n), n, download=True) for n in files
                           if not n.startswith("models/"))  # fmt: skip
    model_items = "".join(
        f"<li data-files-of='{html.escape(m)}'><b>{html.escape(m)}</b>: "
        + " · ".join(_a(download_url(url_prefix, run.run_id, n), n.split("/")[2], download=True) for n in names)
        + (f" · {_a(log_url(run, t), 'training log')}" if (t := training_task(run, m)) else "")
        + "</li>"
        for m, names in by_model.items()
    )
    bar = (
        "<div id='run-links' style='background:#eef4fb;border:1px solid #c9d9ee;border-radius:6px;padding:8px 12px;"
        f"margin:0 0 12px;overflow-wrap:anywhere'>{_a(grid_url(run), 'This run in the grid')} · Downloads: "
        f"{run_files}<details><summary>Model files and training logs</summary><ul class='files'>{model_items}"
        "</ul></details></div>"
    )
    for model in by_model:
        task = training_task(run, model)
        marker = f"<!--model-links:{model}-->"
        if task is not None:
            report = report.replace(marker, "<br><span class='muted'>" + _a(log_url(run, task), "training log")
                                    + "</span>")  # fmt: skip
    for marker, before in (("<!--run-links-->", True), ("<main>", False), ("<body>", False)):
        if marker in report:
            return report.replace(marker, bar if before else marker + bar, 1)
    return bar + report


# --- the reports list -------------------------------------------------------------------------------


def _fmt_duration(run: RunView) -> str:
    if not (run.started and run.ended):
        return ""
    seconds = int((run.ended - run.started).total_seconds())
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def _row(run: RunView, results: dict | None, url_prefix: str) -> str:
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
    links = []
    if results:
        links.append(_a(report_url(url_prefix, run.run_id), "report"))
        links += [
            _a(download_url(url_prefix, run.run_id, n), n, download=True) for n in ("results.json", "report.html")
        ]
    pick = (f"<input type='checkbox' name='run' value='{html.escape(run.run_id)}' "
            f"aria-label='compare {html.escape(run.run_id)}'>" if results else "")  # fmt: skip
    return (
        f"<tr data-run-id='{html.escape(run.run_id)}'><td>{pick}</td>"
        f"<td>{_a(grid_url(run), run.run_id)}</td><td>{when}</td>"
        f"<td><span class='state {html.escape(run.state)}'>{html.escape(run.state)}</span>{failure_summary(run)}</td>"
        f"<td>{html.escape(str(settings.get('profile', '')))}</td><td>{dataset_text}</td>"
        f"<td class='num'>{acc_cells}</td><td>{html.escape(best)}</td><td class='num'>{_fmt_duration(run)}</td>"
        f"<td>{' · '.join(links)}</td></tr>"
    )


def render_index(runs: list[RunView], url_prefix: str) -> str:
    """The reports list: one row per run, newest first, with links to the run, its report and files, why
    a failed run failed, and boxes to pick runs to compare."""
    rows = "".join(_row(run, read_results(run), url_prefix) for run in runs)
    head = "".join(
        f"<th>{h}</th>"
        for h in (
            "",
            "Run",
            "Started",
            "State",
            "Profile",
            "Dataset",
            "Test accuracy",
            "Best model",
            "Duration",
            "Files",
        )  # fmt: skip
    )
    body = (
        f"<form method='get' action='{html.escape(url_prefix)}/compare'>"
        "<p><button type='submit'>Compare selected runs</button> <span class='muted'>(tick two or more finished "
        "runs)</span></p>"
        f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div></form>"
        if runs
        else "<p class='muted'>No runs yet: trigger the DAG <code>gender_classification</code>.</p>"
    )
    return page("Gender classification reports", body)


# --- runs side by side ------------------------------------------------------------------------------

TABLE_METRICS = ("train_accuracy", "test_accuracy", "precision", "recall", "f1")
ALPHA = 0.05


def _flat(value, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for k, v in value.items():
            out |= _flat(v, f"{prefix}{k}." if not isinstance(v, dict) or v else f"{prefix}{k}")
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): value}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return "–" if value is None else str(value)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: the binomial test of min(only_a, only_b) of n at 1/2."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def mcnemar_verdict(only_a: int, only_b: int, significant: bool) -> str:
    """A paired comparison's verdict for the reader. Two models right and wrong on the same images (for example
    an ensemble of one model beside that model) are the same on this test split: no test to call."""
    if only_a == only_b == 0:
        return "no difference: right and wrong on the same images"
    return "significant" if significant else "not significant (could be noise)"


def read_test_predictions(run: RunView, model: str) -> dict[str, tuple[str, str]] | None:
    """{image key: (label, predicted)} on the test split of `model` in `run`, or None when not readable."""
    try:
        key = layout.model_file_key(_safe_run_key(run.run_key, run.run_id), model, "predictions.csv")
        text = open_storage(run.storage_uri).get_bytes(key).decode("utf-8")
    except (OSError, StorageError, ReportNotFound, UnicodeDecodeError):
        return None
    rows = csv.DictReader(io.StringIO(text))
    try:
        return {r["key"]: (r["label"], r["predicted"]) for r in rows if r.get("split") == "test"}
    except KeyError:
        return None


def paired_test(a: dict[str, tuple[str, str]], b: dict[str, tuple[str, str]]) -> dict | None:
    """Exact McNemar between two runs' predictions of the same test images; None when the test splits differ."""
    if not a or set(a) != set(b) or any(a[k][0] != b[k][0] for k in a):
        return None
    a_right = {k for k, (y, p) in a.items() if y == p}
    b_right = {k for k, (y, p) in b.items() if y == p}
    only_a, only_b = len(a_right - b_right), len(b_right - a_right)
    p = mcnemar_exact(only_a, only_b)
    return {"n": len(a), "acc_a": len(a_right) / len(a), "acc_b": len(b_right) / len(a), "only_a_right": only_a,
            "only_b_right": only_b, "p_value": p, "significant": p < ALPHA}  # fmt: skip


def comparison(runs: list[RunView], results: list[dict]) -> dict:
    """What differs between runs (settings, data), Table 1 side by side with deltas against the first
    run, each model's test accuracy with its interval, and paired tests where two runs share a test split."""
    flat = [_flat({"settings": r.get("settings") or {}}) for r in results]
    data = [
        {
            "dataset": (r.get("dataset") or {}).get("dataset_id"),
            "images": (r.get("dataset") or {}).get("images"),
            "source": (r.get("settings") or {}).get("source"),
            **{
                f"{split} images": sum((c or {}).values())
                for split, c in ((r.get("class_balance") or {}).get("splits") or {}).items()
            },
        }  # fmt: skip
        for r in results
    ]
    keys = sorted({k for f in flat for k in f})
    settings_diff = [
        {"setting": k.removeprefix("settings."), "values": [f.get(k) for f in flat]}
        for k in keys
        if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1
    ]
    data_keys = list(dict.fromkeys(k for d in data for k in d))
    data_rows = [{"item": k, "values": [d.get(k) for d in data],
                  "same": len({json.dumps(d.get(k)) for d in data}) == 1} for k in data_keys]  # fmt: skip
    tables = [{row["model"]: row for row in r.get("table") or []} for r in results]
    models = list(dict.fromkeys(m for t in tables for m in t))
    table = []
    for model in models:
        base = tables[0].get(model)
        for i, t in enumerate(tables):
            row = t.get(model)
            if row is None:
                continue
            values = {k: row["ours"].get(k) for k in TABLE_METRICS}
            deltas = {
                k: (values[k] - base["ours"][k])
                if i and base and values[k] is not None and base["ours"].get(k) is not None
                else None
                for k in TABLE_METRICS
            }
            ci = (row.get("ci") or {}).get("accuracy") or [None, None]
            table.append({"model": model, "run": i, "values": values, "deltas": deltas, "ci": ci,
                          "test_accuracy": (row.get("first") or row["ours"]).get("test_accuracy")})  # fmt: skip
    paired = []
    for i in range(1, len(runs)):
        for model in models:
            if model not in tables[0] or model not in tables[i]:
                continue
            a, b = read_test_predictions(runs[0], model), read_test_predictions(runs[i], model)
            test = paired_test(a, b) if a is not None and b is not None else None
            paired.append({"model": model, "a": 0, "b": i, "test": test})
    return {"settings": settings_diff, "data": data_rows, "table": table, "paired": paired, "models": models}


def _delta(d: float | None) -> str:
    if d is None:
        return ""
    return f"<br><span class='{'pos' if d >= 0 else 'neg'}'>{d:+.3f}</span>"


def render_comparison(runs: list[RunView], results: list[dict | None], url_prefix: str) -> str:
    """The comparison page of two or more runs (the first is the baseline the deltas are against)."""
    missing = [r for r, res in zip(runs, results, strict=True) if not res]
    if len(runs) < 2 or missing:
        why = "".join(f"<li><code>{html.escape(r.run_id)}</code> ({html.escape(r.state)}): no results yet</li>"
                      for r in missing)  # fmt: skip
        return page("Compare runs", "<p>Pick two or more finished runs in the "
                    f"{_a(url_prefix + '/', 'reports list')}.</p><ul>{why}</ul>")  # fmt: skip
    c = comparison(runs, results)  # type: ignore[arg-type]
    names = [f"run {i + 1}" for i in range(len(runs))]
    run_rows = "".join(
        f"<tr><td>{names[i]}{' (baseline)' if i == 0 else ''}</td><td>{_a(report_url(url_prefix, r.run_id), r.run_id)}"
        f"</td><td>{html.escape(r.state)}</td><td>{r.started.strftime('%Y-%m-%d %H:%M UTC') if r.started else ''}"
        "</td></tr>"
        for i, r in enumerate(runs)
    )
    th_runs = "".join(f"<th>{n}</th>" for n in names)
    settings_rows = (
        "".join(
            f"<tr data-setting='{html.escape(s['setting'])}'><td><code>{html.escape(s['setting'])}</code></td>"
            + "".join(f"<td><code>{html.escape(_fmt(v))}</code></td>" for v in s["values"])
            + "</tr>"
            for s in c["settings"]
        )
        or f"<tr><td colspan='{len(runs) + 1}'>The runs have the same settings.</td></tr>"
    )
    data_rows = "".join(
        f"<tr><td>{html.escape(d['item'])}</td>"
        + "".join(
            f"<td class='{'same' if d['same'] else 'neg'}'><code>{html.escape(_fmt(v))}</code></td>"
            for v in d["values"]
        )
        + "</tr>"  # fmt: skip
        for d in c["data"]
    )
    metric_heads = "".join(f"<th>{k.replace('_', ' ')}</th>" for k in TABLE_METRICS)
    table_rows = "".join(
        f"<tr data-model='{html.escape(t['model'])}' data-run='{t['run'] + 1}'><td>{html.escape(t['model'])}</td>"
        f"<td>{names[t['run']]}</td>"
        + "".join(f"<td class='num'>{_fmt_metric(t['values'][k])}{_delta(t['deltas'][k])}</td>" for k in TABLE_METRICS)
        + "</tr>"
        for t in c["table"]
    )
    acc_rows = "".join(
        f"<tr><td>{html.escape(t['model'])}</td><td>{names[t['run']]}</td>"
        f"<td class='num'>{_fmt_metric(t['test_accuracy'])}</td><td class='num'>{_fmt_ci(t['ci'])}</td>"
        f"<td>{_bar(t['test_accuracy'], t['ci'])}</td></tr>"
        for t in c["table"]
    )
    paired_rows = "".join(
        f"<tr data-paired='{html.escape(p['model'])}'><td>{html.escape(p['model'])}</td><td>{names[p['a']]} vs "
        f"{names[p['b']]}</td>"
        + (
            f"<td class='num'>{p['test']['n']}</td><td class='num'>{p['test']['acc_a'] - p['test']['acc_b']:+.3f}</td>"
            f"<td class='num'>{p['test']['only_a_right']}</td><td class='num'>{p['test']['only_b_right']}</td>"
            f"<td class='num'>{p['test']['p_value']:.3g}</td><td>"
            + mcnemar_verdict(p["test"]["only_a_right"], p["test"]["only_b_right"], p["test"]["significant"])
            + "</td>"
            if p["test"]
            else "<td colspan='6' class='muted'>Different test splits (other data, seed or split): no paired test; "
            "compare the intervals above.</td>"
        )
        + "</tr>"
        for p in c["paired"]
    )
    body = (
        f"<div class='scroll'><table id='compare-runs'><tr><th></th><th>Run</th><th>State</th><th>Started</th></tr>"
        f"{run_rows}</table></div>"
        f"<h2>Settings that differ</h2><div class='scroll'><table id='compare-settings'><tr><th>Setting</th>{th_runs}"
        f"</tr>{settings_rows}</table></div>"
        f"<h2>Data</h2><div class='scroll'><table id='compare-data'><tr><th></th>{th_runs}</tr>{data_rows}</table></div>"
        f"<h2>Table 1, side by side</h2><p class='muted'>Test-set weighted averages (a run with repeats: their mean); "
        f"below each value its difference from run 1.</p><div class='scroll'><table id='compare-table1'><tr>"
        f"<th>Model</th><th>Run</th>{metric_heads}</tr>{table_rows}</table></div>"
        f"<h2>Test accuracy with its 95% interval</h2><p class='muted'>Bootstrap over the test images (the first "
        f"repeat).</p><div class='scroll'><table id='compare-accuracy'><tr><th>Model</th><th>Run</th><th>Accuracy</th>"
        f"<th>95% CI</th><th></th></tr>{acc_rows}</table></div>"
        f"<h2>Paired test</h2><p class='muted'>Where two runs predicted the same test images (same data and split): "
        f"the exact McNemar test on the images exactly one run got right; p &lt; {ALPHA} is called significant."
        f"</p><div class='scroll'><table id='compare-paired'><tr><th>Model</th><th>Runs</th><th>Test images</th>"
        f"<th>Accuracy A − B</th><th>Only A right</th><th>Only B right</th><th>p</th><th>Verdict</th></tr>"
        f"{paired_rows}</table></div>"
    )
    return page("Compare runs", body)


def _fmt_metric(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def _fmt_ci(ci) -> str:
    return "n/a" if not ci or ci[0] is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _bar(value, ci) -> str:
    """The interval as a small bar on [0, 1] (inline style only), with the value marked."""
    if value is None or not ci or ci[0] is None:
        return ""
    lo, hi = 100 * ci[0], 100 * ci[1]
    return (
        f"<div role='img' aria-label='accuracy {value:.3f}, 95% interval {ci[0]:.3f} to {ci[1]:.3f}' "
        "style='position:relative;width:8em;height:.8em;background:#eee'>"
        f"<div style='position:absolute;left:{lo:.1f}%;width:{max(hi - lo, 0.5):.1f}%;height:100%;background:#9cc3e6'>"
        f"</div><div style='position:absolute;left:{100 * value:.1f}%;width:2px;height:100%;background:#123'></div></div>"
    )
