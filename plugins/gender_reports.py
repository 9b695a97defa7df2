"""Airflow 3 plugin: each run's comparison report inside the Airflow UI.

A FastAPI app mounted on the API server at /gender-reports serves `runs/<run>/report.html` from the
pipeline's object storage, and an external view adds a "Comparison report" tab to every run of the
DAG. Only logged-in users who may read the DAG's runs get a report (Airflow's own JWT, from the
session cookie or a bearer token); run ids are mapped to storage keys by the same function the
pipeline uses, so no request can name a file outside the reports.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

URL_PREFIX = "/gender-reports"
DAG_ID = "gender_classification"


def create_app():
    """The FastAPI app (built lazily: the API server calls this once, parsing never does)."""
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
    from airflow.api_fastapi.core_api.security import requires_access_dag
    from fastapi import Depends, FastAPI, HTTPException
    from fastapi.responses import HTMLResponse

    app = FastAPI(title="Gender classification reports", docs_url=None, redoc_url=None, openapi_url=None)
    can_read_runs = Depends(requires_access_dag("GET", DagAccessEntity.RUN, param_dag_id=DAG_ID))

    @app.get("/runs/{run_id:path}", response_class=HTMLResponse, dependencies=[can_read_runs])
    def report(run_id: str) -> HTMLResponse:
        from gender_tasks.reporting.access import ReportNotFound, read_report

        try:
            html = read_report(run_id)
        except ReportNotFound as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None
        return HTMLResponse(html, headers={"Content-Security-Policy": "script-src 'none'; object-src 'none'"})

    @app.get("/", response_class=HTMLResponse, dependencies=[can_read_runs])
    def index() -> HTMLResponse:
        from gender_tasks.reporting.access import render_index

        return HTMLResponse(render_index(URL_PREFIX))

    return app


class _LazyApp:
    """Defers importing FastAPI and the package until the API server first uses the app."""

    def __init__(self):
        self._app = None

    async def __call__(self, scope, receive, send):
        if self._app is None:
            self._app = create_app()
        await self._app(scope, receive, send)


class GenderReportsPlugin(AirflowPlugin):
    name = "gender_reports"
    fastapi_apps = [{"app": _LazyApp(), "url_prefix": URL_PREFIX, "name": "Gender classification reports"}]
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
