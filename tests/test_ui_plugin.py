"""The report inside the Airflow UI: the plugin served by a real Airflow API server.

Only logged-in users read reports, no request reads a file outside the reports, and a real browser
(headless Chromium) loads a finished run's report through the plugin and shows its table.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from airflow_stack import free_port, headless_chrome, raw_request
from helpers import write_dataset

REPO = Path(__file__).resolve().parent.parent
RUN_ID = "manual__2026-01-01T00:00:00+00:00"
PASSWORD = "reader-password"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A real (tiny) run's report in a storage folder."""
    from gender_tasks import pipeline

    tmp = tmp_path_factory.mktemp("ui")
    src = write_dataset(tmp / "faces", 12)
    run = pipeline.prepare({"source": str(src), "storage": str(tmp / "store"), "profile": "tiny",
                            "models": ["cnn"], "epochs": 1, "label_audit": False}, run_id=RUN_ID)  # fmt: skip
    run = pipeline.preprocess(pipeline.validate(pipeline.split(pipeline.ingest(run))))
    pipeline.report(run, [pipeline.train(run, "cnn")])
    (tmp / "store" / "secret.txt").write_text("not a report")
    return tmp / "store"


@pytest.fixture(scope="module")
def api_server(airflow_db, finished_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    (tmp / "passwords.json").write_text(json.dumps({"reader": PASSWORD}))
    port = free_port()
    env = {
        **os.environ,
        "GENDER_STORAGE": str(finished_run),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "reader:viewer",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(tmp / "passwords.json"),
        "AIRFLOW__API_AUTH__JWT_SECRET": "test-secret-for-the-ui-plugin-test-0123456789",
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
    }
    log = open(tmp / "api-server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "airflow", "api-server", "--port", str(port), "--workers", "1"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"api-server exited: {(tmp / 'api-server.log').read_text()[-3000:]}")
            try:
                if raw_request(port, "GET", "/api/v2/monitor/health")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(1)
        else:
            raise RuntimeError(f"api-server did not start: {(tmp / 'api-server.log').read_text()[-3000:]}")
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def token(api_server) -> str:
    status, body = raw_request(api_server, "POST", "/auth/token", body={"username": "reader", "password": PASSWORD})
    assert status in (200, 201), body
    return json.loads(body)["access_token"]


@pytest.mark.slow
def test_plugin_is_registered_with_a_run_tab(api_server, token):
    status, body = raw_request(api_server, "GET", "/api/v2/plugins", token)
    assert status == 200, body
    (plugin,) = [p for p in json.loads(body)["plugins"] if p["name"] == "gender_reports"]
    views = {v["destination"]: v["href"] for v in plugin["external_views"]}
    assert views["dag_run"] == "/gender-reports/runs/{RUN_ID}"


@pytest.mark.slow
def test_logged_in_user_reads_the_report(api_server, token):
    from urllib.parse import quote

    status, body = raw_request(api_server, "GET", f"/gender-reports/runs/{quote(RUN_ID, safe='')}", token)
    assert status == 200
    assert b'id="table1-data"' in body and b'data-model="cnn"' in body


@pytest.mark.slow
@pytest.mark.parametrize("path", ["/gender-reports/runs/x", "/gender-reports/", "/gender-reports/compare?run=a&run=b",
                                  "/gender-reports/download?run=x&file=results.json"])  # fmt: skip
def test_unauthenticated_requests_are_refused(api_server, path):
    status, body = raw_request(api_server, "GET", path)
    assert status in (401, 403), (status, body[:200])
    status, _ = raw_request(api_server, "GET", path, token="not-a-valid-token")
    assert status in (401, 403)


@pytest.mark.slow
@pytest.mark.parametrize(
    "path",
    [
        "/gender-reports/runs/../secret.txt",
        "/gender-reports/runs/..%2Fsecret.txt",
        "/gender-reports/runs/%2e%2e%2fsecret.txt",
        "/gender-reports/runs/%2E%2E/%2E%2E/secret.txt",
        "/gender-reports/runs/..%252f..%252fsecret.txt",
        "/gender-reports/runs/..",
        "/gender-reports/runs/%2e%2e",
        "/gender-reports/runs/....//secret.txt",
        "/gender-reports/runs/%2Fetc%2Fpasswd",
        "/gender-reports/runs/..%5c..%5csecret.txt",
        "/gender-reports/download?run=manual__2026-01-01T00%3A00%3A00%2B00%3A00&file=..%2Fsecret.txt",
        "/gender-reports/download?run=manual__2026-01-01T00%3A00%3A00%2B00%3A00&file=..%2F..%2Fsecret.txt",
        "/gender-reports/download?run=..&file=secret.txt",
        "/gender-reports/download?run=x&file=%2Fetc%2Fpasswd",
    ],
)
def test_path_traversal_is_refused(api_server, token, path):
    status, body = raw_request(api_server, "GET", path, token)
    assert status in (400, 404), (status, body[:200])
    assert b"not a report" not in body and b"root:" not in body


@pytest.mark.slow
def test_browser_loads_the_report_through_the_plugin(api_server, token, tmp_path):
    driver = headless_chrome(tmp_path / "profile", "1280,1600", console_log=True)  # CSP violations land there
    from selenium.webdriver.common.by import By

    try:
        base = f"http://127.0.0.1:{api_server}"
        driver.get(f"{base}/gender-reports/runs/x")  # any page of the origin, to set its cookie
        driver.add_cookie({"name": "_token", "value": token, "path": "/"})
        from urllib.parse import quote

        driver.get(f"{base}/gender-reports/runs/{quote(RUN_ID, safe='')}")
        table = driver.find_element(By.ID, "table1-data")
        rows = table.find_elements(By.CSS_SELECTOR, "tr[data-model]")
        assert [r.get_attribute("data-model") for r in rows] == ["cnn"]
        assert "Table 1, reproduced" in driver.find_element(By.TAG_NAME, "h2").text
        shots = Path(os.environ.get("GENDER_TEST_ARTIFACTS", tmp_path))
        shots.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(shots / "report-through-plugin.png"))
        # The strict policy renders today's report with no violation (and the page did render: Table 1 above).
        violations = [e["message"] for e in driver.get_log("browser") if "Content Security Policy" in e["message"]]
        assert violations == []
        # Without the cookie the same page is refused.
        driver.delete_all_cookies()
        driver.get(f"{base}/gender-reports/runs/{quote(RUN_ID, safe='')}")
        assert "table1-data" not in driver.page_source
    finally:
        driver.quit()


# --- every state of the report tab ------------------------------------------------------------------


def _view(state: str, **kw):
    from gender_tasks.reporting.access import RunView

    return RunView(run_id="manual__2026-02-02T00:00:00+00:00", state=state, **kw)


def test_a_queued_or_running_run_says_it_is_not_ready_with_its_state(tmp_path):
    from gender_tasks.reporting.access import answer

    for state in ("queued", "running"):
        status, body = answer("x", _view(state, record={"storage": str(tmp_path), "run_key": "r"}))
        assert status == 200 and "Report not ready yet" in body and f">{state}<" in body


def test_a_failed_run_names_the_failed_task(tmp_path):
    from gender_tasks.reporting.access import answer

    status, body = answer("x", _view("failed", failed_tasks=["validate"], record={"storage": str(tmp_path)}))
    assert status == 200 and "the run failed" in body and "data-failed-task='validate'><b>validate</b>" in body


def test_the_plugins_app_is_built_on_its_first_request_and_only_once():
    """Loading the plugins (every Airflow process) builds no FastAPI app; the API server's first request does."""
    import asyncio

    from gender_tasks.reporting.lazy_app import LazyApp

    built, served = [], []

    def build():
        built.append(1)

        async def app(scope, receive, send):
            served.append(scope["path"])

        return app

    lazy = LazyApp(build)
    assert built == []
    for path in ("/a", "/b"):
        asyncio.run(lazy({"type": "http", "path": path}, None, None))
    assert built == [1] and served == ["/a", "/b"]


@pytest.mark.slow  # finished_run trains a model
def test_a_report_is_read_from_the_storage_the_run_recorded(finished_run, tmp_path):
    """A run on a second storage folder: the record, not the API server's default, says where."""
    from gender_tasks.layout import run_key_for
    from gender_tasks.reporting.access import answer

    record = {"storage": str(finished_run), "run_key": run_key_for(RUN_ID)}
    status, body = answer(RUN_ID, _view("success", record=record))
    assert status == 200 and 'id="table1-data"' in body
    status, body = answer(RUN_ID, _view("success", record={"storage": str(tmp_path), "run_key": "gone"}))
    assert status == 404 and "Report not found" in body


@pytest.mark.slow
def test_a_300_character_run_id_is_not_found_not_a_server_error(api_server, token):
    status, body = raw_request(api_server, "GET", "/gender-reports/runs/" + "a" * 300, token)
    assert status == 404 and b"Report not found" in body


@pytest.mark.slow
def test_pages_carry_the_strict_csp(api_server, token):
    from urllib.parse import quote

    conn = http.client.HTTPConnection("127.0.0.1", api_server, timeout=30)
    for path in (f"/gender-reports/runs/{quote(RUN_ID, safe='')}", "/gender-reports/runs/nope", "/gender-reports/"):
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        resp.read()
        csp = resp.getheader("Content-Security-Policy")
        for directive in ("default-src 'none'", "style-src 'unsafe-inline'", "img-src data:", "base-uri 'none'",
                          "frame-ancestors 'self'", "sandbox"):  # fmt: skip
            assert directive in csp, (path, csp)
        # Only the list submits a form (its runs to compare, to this app); nothing may run scripts.
        assert ("form-action 'self'" if path == "/gender-reports/" else "form-action 'none'") in csp, (path, csp)
        assert "script-src" not in csp and "allow-scripts" not in csp and "allow-same-origin" not in csp
    conn.close()


@pytest.mark.slow
def test_a_browser_without_a_session_is_sent_to_the_login_page(api_server):
    conn = http.client.HTTPConnection("127.0.0.1", api_server, timeout=30)
    conn.request("GET", "/gender-reports/runs/x", headers={"Accept": "text/html,application/xhtml+xml"})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    assert resp.status == 303
    assert resp.getheader("Location").startswith("/auth/login?next=")
    assert "gender-reports%2Fruns%2Fx" in resp.getheader("Location")
