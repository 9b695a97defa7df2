"""Airflow 3 plugin: each run's comparison report inside the Airflow UI.

A FastAPI app mounted on the API server at /gender-reports serves a run's report from the storage its
run record names (the `prepare` task's XCom: storage and report key), so a run on any storage shows its
report. An external view adds a "Comparison report" tab to every run of the DAG; Browse → "Gender
classification reports" lists the runs as a table. Every answer is a small readable page: the report,
not ready yet (with the run's state), failed (which task), not found (404); a request without a session
is sent to the login page. Only logged-in users who may read the DAG's runs get a report (Airflow's own
JWT, from the session cookie or a bearer token). Reports and the list carry a strict CSP (nothing runs,
loads or re-bases; only the list submits, its compare form).

A failed run says why on its tab and in the list: each failed task with the message its step recorded
(the DAG's `failure` XCom, see dags/gender_classification.py) and a link to its log. /download serves a
run's files (results.json, the report, label_audit.csv, each model's outputs) and /compare puts two or
more runs side by side, behind the same login.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from gender_tasks.reporting.lazy_app import LazyApp

URL_PREFIX = "/gender-reports"
DAG_ID = "gender_classification"
LISTED_RUNS = 50
# The tasks whose return value is the run record: the latest one that finished has the most in it.
RECORD_TASKS = ("preprocess", "validate", "split", "ingest", "prepare")
FAILURE_XCOM = "failure"  # what a failing step recorded (dags/gender_classification.py `_record_failure`)
COMPARED_RUNS = 6  # the most runs one comparison page puts side by side


def _xcom_record(session, run_id: str) -> dict | None:
    """The run record the pipeline passed along (see gender_tasks.pipeline), or None for older runs."""
    import json

    from airflow.models.xcom import XComModel
    from sqlalchemy import select

    rows = session.scalars(
        select(XComModel).where(XComModel.dag_id == DAG_ID, XComModel.run_id == run_id,
                                XComModel.task_id.in_(RECORD_TASKS), XComModel.key == "return_value")
    ).all()  # fmt: skip
    by_task = {row.task_id: XComModel.deserialize_value(row) for row in rows}
    for task in RECORD_TASKS:
        value = by_task.get(task)
        if isinstance(value, str):
            value = json.loads(value)
        if isinstance(value, dict) and "run_key" in value:
            return value
    return None


def _tasks(session, run_id: str) -> list:
    """The run's task instances, each with the message its failure recorded (if any)."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.xcom import XComModel
    from sqlalchemy import select

    from gender_tasks.reporting.access import TaskView

    errors = {}
    for row in session.scalars(
        select(XComModel).where(XComModel.dag_id == DAG_ID, XComModel.run_id == run_id,
                                XComModel.key == FAILURE_XCOM)
    ).all():  # fmt: skip
        value = XComModel.deserialize_value(row)
        if isinstance(value, dict) and isinstance(value.get("error"), str):
            errors[(row.task_id, row.map_index)] = value["error"]
    rows = session.execute(
        select(TaskInstance.task_id, TaskInstance.map_index, TaskInstance.rendered_map_index, TaskInstance.state)
        .where(TaskInstance.dag_id == DAG_ID, TaskInstance.run_id == run_id)
        .order_by(TaskInstance.start_date.is_(None), TaskInstance.start_date, TaskInstance.map_index)
    ).all()  # fmt: skip
    return [TaskView(task_id=t, map_index=m, label=label, state=str(state) if state else None,
                     error=errors.get((t, m)) if str(state) == "failed" else None)
            for t, m, label, state in rows]  # fmt: skip


def _view(session, dag_run):
    from gender_tasks.reporting.access import RunView

    tasks = _tasks(session, dag_run.run_id)
    failed = sorted({t.task_id for t in tasks if t.state == "failed"})
    return RunView(run_id=dag_run.run_id, state=str(dag_run.state), record=_xcom_record(session, dag_run.run_id),
                   failed_tasks=failed, started=dag_run.start_date, ended=dag_run.end_date, tasks=tasks,
                   dag_id=DAG_ID)  # fmt: skip


def find_run(run_id: str):
    """The run as a RunView, or None when the DAG has no such run."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    if len(run_id) > 250:  # longer than any run id Airflow stores
        return None
    with create_session() as session:
        dag_run = session.scalar(select(DagRun).where(DagRun.dag_id == DAG_ID, DagRun.run_id == run_id))
        return None if dag_run is None else _view(session, dag_run)


def recent_runs(limit: int = LISTED_RUNS) -> list:
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        runs = session.scalars(
            select(DagRun).where(DagRun.dag_id == DAG_ID).order_by(DagRun.run_after.desc()).limit(limit)
        ).all()
        return [_view(session, r) for r in runs]


def create_app():
    """The FastAPI app (built lazily: the API server calls this once, parsing never does)."""
    from html import escape
    from urllib.parse import quote

    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
    from airflow.api_fastapi.core_api.security import requires_access_dag
    from fastapi import Depends, FastAPI, Query, Request
    from fastapi.exception_handlers import http_exception_handler
    from fastapi.responses import HTMLResponse, RedirectResponse, Response
    from starlette.exceptions import HTTPException

    from gender_tasks.reporting import access

    app = FastAPI(title="Gender classification reports", docs_url=None, redoc_url=None, openapi_url=None)
    can_read_runs = Depends(requires_access_dag("GET", DagAccessEntity.RUN, param_dag_id=DAG_ID))

    @app.exception_handler(HTTPException)
    async def to_login(request: Request, exc: HTTPException):
        """No session (or an expired one): to the login page, then back here. Others: Airflow's answer."""
        if exc.status_code == 401 and "text/html" in request.headers.get("accept", ""):
            return RedirectResponse(get_auth_manager().get_url_login(next_url=str(request.url)), status_code=303)
        return await http_exception_handler(request, exc)

    def html(body: str, status: int = 200, csp: str = access.STRICT_CSP) -> HTMLResponse:
        return HTMLResponse(body, status_code=status, headers={"Content-Security-Policy": csp})

    @app.get("/runs/{run_id:path}", response_class=HTMLResponse, dependencies=[can_read_runs])
    def report(run_id: str) -> HTMLResponse:
        status, body = access.answer(run_id, find_run(run_id), URL_PREFIX)
        return html(body, status, access.REPORT_CSP)

    @app.get("/download", dependencies=[can_read_runs])
    def download(run: str, file: str) -> Response:
        found = find_run(run)
        if found is None:
            return html(access.not_found_page(run), 404)
        try:
            data, filename, media = access.read_download(found, file)
        except access.DownloadError as exc:
            return html(access.page("No such file", f"<p>{escape(str(exc))}</p>"), exc.status)
        return Response(data, media_type=media, headers={
            "Content-Disposition": f"attachment; filename*=UTF-8''{quote(filename)}",
            "Content-Security-Policy": access.DOWNLOAD_CSP, "X-Content-Type-Options": "nosniff"})  # fmt: skip

    @app.get("/compare", response_class=HTMLResponse, dependencies=[can_read_runs])
    def compare(run: list[str] = Query(default=[])) -> HTMLResponse:  # noqa: B008 - FastAPI's idiom
        wanted = list(dict.fromkeys(run))
        if len(wanted) > COMPARED_RUNS:
            return html(access.page("Compare runs", f"<p>Pick at most {COMPARED_RUNS} runs to compare "
                                    f"({len(wanted)} were picked).</p>"), 400)  # fmt: skip
        runs = [find_run(r) for r in wanted]
        unknown = [r for r, found in zip(wanted, runs, strict=True) if found is None]
        if unknown:
            return html(access.not_found_page(unknown[0]), 404)
        runs.sort(key=lambda r: (r.started is None, r.started or 0))  # oldest first: deltas read later - earlier
        results = [access.read_results(r) for r in runs]
        return html(access.render_comparison(runs, results, URL_PREFIX), csp=access.REPORT_CSP)

    @app.get("/", response_class=HTMLResponse, dependencies=[can_read_runs])
    def index() -> HTMLResponse:
        return html(access.render_index(recent_runs(), URL_PREFIX), csp=access.LIST_CSP)

    return app


class GenderReportsPlugin(AirflowPlugin):
    name = "gender_reports"
    fastapi_apps = [{"app": LazyApp(create_app), "url_prefix": URL_PREFIX, "name": "Gender classification reports"}]
    external_views = [
        {
            "name": "Comparison report",
            "href": f"{URL_PREFIX}/runs/{{RUN_ID}}",
            "destination": "dag_run",
            "url_route": "comparison-report",
        },
        {
            "name": "Gender classification reports",
            "href": f"{URL_PREFIX}/",
            "destination": "nav",
            "category": "browse",
            "url_route": "gender-reports",
        },  # fmt: skip
    ]
