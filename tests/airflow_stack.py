"""A real Airflow for tests: its processes (Stack), HTTP to its API server (a free port, raw
requests, the REST API), and a headless browser on its pages."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raw_request(port: int, method: str, path: str, token: str | None = None,
                body: dict | None = None) -> tuple[int, bytes]:  # fmt: skip
    """One request to 127.0.0.1:`port`; the path goes on the wire exactly as given (no normalisation)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    try:
        conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def api_request(port: int, method: str, path: str, token: str | None = None,
                body: dict | None = None) -> tuple[int, dict | str]:  # fmt: skip
    """A REST API call: the status and the JSON answer (the text where it is not JSON)."""
    status, data = raw_request(port, method, path, token, body)
    raw = data.decode(errors="replace")
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


class Api:
    """The Airflow REST API as a client sees it: a JWT from /auth/token, then /api/v2."""

    def __init__(self, port: int):
        self.port = port
        self.token: str | None = None

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict | str]:
        return api_request(self.port, method, path, self.token, body)

    def login(self, username: str, password: str) -> None:
        status, body = self.request("POST", "/auth/token", {"username": username, "password": password})
        assert status in (200, 201), f"login failed: {status} {body}"
        self.token = body["access_token"]


class Stack:
    """Airflow's processes, each in its own process group with its own log file; all ended on stop()."""

    def __init__(self, folder: Path, env: dict):
        self.folder = folder
        self.env = env
        self.procs: dict[str, subprocess.Popen] = {}
        # Every process of the stack inherits this marker, so that stop() finds those that left its groups.
        self.marker = env.setdefault("GENDER_TEST_STACK_ID", secrets.token_hex(8))

    def log(self, name: str) -> Path:
        return self.folder / f"{name}.log"

    def tail(self, name: str, chars: int = 4000) -> str:
        path = self.log(name)
        return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"

    def run(self, name: str, args: list[str], timeout: float, extra_env: dict | None = None) -> None:
        """An airflow command to completion (its output in <name>.log)."""
        with open(self.log(name), "wb") as out:
            done = subprocess.run([sys.executable, "-m", "airflow", *args], env={**self.env, **(extra_env or {})},
                                  stdout=out, stderr=subprocess.STDOUT, timeout=timeout, start_new_session=True)  # fmt: skip
        assert done.returncode == 0, f"airflow {' '.join(args)} failed:\n{self.tail(name)}"

    def start(self, name: str, args: list[str], extra_env: dict | None = None) -> None:
        out = open(self.log(name), "wb")  # the child holds its own copy of the descriptor
        self.procs[name] = subprocess.Popen([sys.executable, "-m", "airflow", *args],
                                            env={**self.env, **(extra_env or {})}, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        out.close()

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}:\n{self.tail(name)}")

    def _marked_pids(self) -> list[int]:
        """Every process still carrying this stack's marker (children that left their process group too)."""
        pids = []
        needle = f"GENDER_TEST_STACK_ID={self.marker}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
        return pids

    def stop(self, grace: float = 30.0) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        for pid in self._marked_pids():  # stragglers, e.g. a task process in a session of its own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def wait(self, what: str, probe, timeout: float, every: float = 2.0):
        """Poll `probe` until it returns something truthy; fail with the logs if a process dies or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            try:
                result = probe()
            except (OSError, http.client.HTTPException):
                result = None
            if result:
                return result
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {name}.log ---\n{self.tail(name, 1500)}" for name in self.procs)
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{logs}")
            time.sleep(every)


def headless_chrome(profile: Path, window: str, *, console_log: bool = False):
    """Headless Chromium through Selenium (the caller quits it); skipped where it is not installed,
    failed under CI, where .ci/run installs it. `console_log` keeps the page's console messages."""
    import pytest

    browser, driver_path = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (browser and driver_path):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromedriver are required under CI (.ci/run installs them)")
        pytest.skip("chromium / chromedriver not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", f"--window-size={window}"):  # fmt: skip
        options.add_argument(flag)
    if console_log:
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver_path), options=options)
