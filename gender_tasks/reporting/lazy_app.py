"""An ASGI app built on its first request: the UI plugins hand Airflow one at import time, so that loading
the plugins (in every Airflow process) imports neither FastAPI nor the package's reporting stack.

It imports nothing but `collections.abc`: the plugins import this module when Airflow loads them."""

from __future__ import annotations

from collections.abc import Callable


class LazyApp:
    """Calls `build()` once, on the first request the API server routes to it, and serves that app."""

    def __init__(self, build: Callable[[], Callable]):
        self._build = build
        self._app = None

    async def __call__(self, scope, receive, send):
        if self._app is None:
            self._app = self._build()
        await self._app(scope, receive, send)
