"""Airflow 3 plugin: each gender_scoring run's summary inside the Airflow UI.

A FastAPI app mounted at /gender-scoring serves a scoring run's summary.html from the storage its `score`
task returned (its XCom: storage and score key), and lists the recent scoring runs (Browse → "Gender scoring
summaries"); a "Scoring summary" tab opens it from a run. Only logged-in users who may read the
gender_scoring DAG's runs see them; pages carry the reports' strict CSP (nothing runs, loads or submits).
Imports only the storage and the standard library at request time: no training stack in the API server.
The page is read like any stored object: checked against the sha256 recorded beside it ("Summary damaged",
with the fix, where it changed since it was written).
"""

from __future__ import annotations

import html
import re

from airflow.plugins_manager import AirflowPlugin

from gender_tasks.reporting.lazy_app import LazyApp

URL_PREFIX = "/gender-scoring"
DAG_ID = "gender_scoring"
TASK_ID = "score"
LISTED_RUNS = 50
SCORE_KEY = re.compile(r"^[0-9a-f]{24}$")


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;text-align:left}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>{body}</body></html>")  # fmt: skip


def _result(session, run_id: str):
    """The score task's return value for the run (a dict), or None."""
    import json

    from airflow.models.xcom import XComModel
    from sqlalchemy import select

    row = session.scalar(select(XComModel).where(XComModel.dag_id == DAG_ID, XComModel.run_id == run_id,
                                                 XComModel.task_id == TASK_ID, XComModel.key == "return_value"))  # fmt: skip
    value = None if row is None else XComModel.deserialize_value(row)
    if isinstance(value, str):
        value = json.loads(value)
    return value if isinstance(value, dict) else None


def summary_page(run_id: str, state: str | None, result: dict | None) -> tuple[int, str]:
    """(status, page) for one scoring run: its summary from storage, or why there is none."""
    if state is None:
        return 404, _page("Not found", f"<p>No gender_scoring run {html.escape(run_id)}.</p>")
    if result and "skipped" in result:
        return 200, _page("Nothing scored", f"<p>{html.escape(str(result['skipped']))}</p>")
    key = (result or {}).get("score_key", "")
    if not SCORE_KEY.match(str(key)):
        return 200, _page("No summary yet", f"<p>Run {html.escape(run_id)} is {html.escape(state)}: its summary "
                                            "appears when the score task has finished.</p>")  # fmt: skip
    from gender_tasks import layout
    from gender_tasks.integrity import IntegrityError
    from gender_tasks.storage import StorageError, get_recorded, open_storage

    try:  # checked against the sha256 recorded when it was written, like any stored object read back
        body = get_recorded(open_storage(result.get("storage") or ""),
                            f"{layout.score_prefix(key)}/{layout.SCORING_PAGE}").decode()  # fmt: skip
    except IntegrityError as exc:  # its message names the object and the fix (verify --repair, score again)
        return 500, _page("Summary damaged", f"<p>{html.escape(str(exc)[:600])}</p>")
    except (FileNotFoundError, StorageError) as exc:
        why = ("<p><code>gc</code> removes scorings older than its retention (GENDER_KEEP_DAYS); trigger a scoring of "
               "the same images to write it again.</p>")  # fmt: skip
        return 404, _page("Summary missing", f"<p>{html.escape(str(exc)[:300])}</p>{why}")
    return 200, body


def index_page(runs: list[tuple[str, str, dict | None]]) -> str:
    rows = []
    for run_id, state, result in runs:
        link = f"{URL_PREFIX}/runs/{html.escape(run_id, quote=True)}"
        r = result or {}
        what = html.escape(f"{r.get('model', '')} of {r.get('run_key', '')}") if r.get("model") else ""
        images = r.get("images", "")
        rows.append(f"<tr><td><a href='{link}' target='_blank' rel='noopener'>{html.escape(run_id)}</a></td>"
                    f"<td>{html.escape(state)}</td><td>{what}</td><td>{images}</td></tr>")  # fmt: skip
    table = "<table><tr><th>run</th><th>state</th><th>model</th><th>images</th></tr>" + "".join(rows) + "</table>"
    return _page("Gender scoring summaries", table if rows else "<p>No scoring runs yet.</p>")


def create_app():
    """The FastAPI app (built lazily: the API server calls this once, parsing never does)."""
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
    from airflow.api_fastapi.core_api.security import requires_access_dag
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from fastapi import Depends, FastAPI
    from fastapi.responses import HTMLResponse
    from sqlalchemy import select

    from gender_tasks.reporting.access import STRICT_CSP as CSP  # the reports' own policy, not a copy

    list_csp = f"{CSP} allow-popups allow-popups-to-escape-sandbox"  # the list's links open in a new tab
    app = FastAPI(title="Gender scoring summaries", docs_url=None, redoc_url=None, openapi_url=None)
    can_read_runs = Depends(requires_access_dag("GET", DagAccessEntity.RUN, param_dag_id=DAG_ID))

    @app.get("/runs/{run_id:path}", response_class=HTMLResponse, dependencies=[can_read_runs])
    def summary(run_id: str) -> HTMLResponse:
        with create_session() as session:
            run = session.scalar(select(DagRun).where(DagRun.dag_id == DAG_ID, DagRun.run_id == run_id[:250]))
            state = None if run is None else str(run.state)
            result = None if run is None else _result(session, run_id)
        status, body = summary_page(run_id, state, result)
        return HTMLResponse(body, status_code=status, headers={"Content-Security-Policy": CSP})

    @app.get("/", response_class=HTMLResponse, dependencies=[can_read_runs])
    def index() -> HTMLResponse:
        with create_session() as session:
            runs = session.scalars(select(DagRun).where(DagRun.dag_id == DAG_ID)
                                   .order_by(DagRun.run_after.desc()).limit(LISTED_RUNS)).all()  # fmt: skip
            listed = [(r.run_id, str(r.state), _result(session, r.run_id)) for r in runs]
        return HTMLResponse(index_page(listed), headers={"Content-Security-Policy": list_csp})

    return app


class GenderScoringViewPlugin(AirflowPlugin):
    name = "gender_scoring_view"
    fastapi_apps = [{"app": LazyApp(create_app), "url_prefix": URL_PREFIX, "name": "Gender scoring summaries"}]
    external_views = [
        {"name": "Scoring summary", "href": f"{URL_PREFIX}/runs/{{RUN_ID}}", "destination": "dag_run",
         "url_route": "scoring-summary"},
        {"name": "Gender scoring summaries", "href": f"{URL_PREFIX}/", "destination": "nav", "category": "browse",
         "url_route": "gender-scoring"},
    ]  # fmt: skip
