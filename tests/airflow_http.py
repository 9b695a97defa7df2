"""HTTP to an Airflow API server the tests started: a free port, raw requests and the REST API."""

from __future__ import annotations

import http.client
import json
import socket


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
