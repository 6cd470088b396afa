"""A blocking HTTP client for an ASGI app, for sync tests (hypothesis included).

httpx's ASGITransport is async only, and Starlette's TestClient warns when it runs on
httpx rather than httpx2; this runs httpx.AsyncClient on an anyio blocking portal."""

from __future__ import annotations

from contextlib import ExitStack
from functools import partial
from typing import Any

import httpx
from anyio.from_thread import start_blocking_portal
from fastapi import FastAPI


class AppClient:
    def __init__(self, app: FastAPI) -> None:
        self._stack = ExitStack()
        self._portal = self._stack.enter_context(start_blocking_portal("asyncio"))
        transport = httpx.ASGITransport(app=app)
        self._client = httpx.AsyncClient(transport=transport, base_url="http://web")

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return self._portal.call(partial(self._client.request, method, url, **kwargs))

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def close(self) -> None:
        self._portal.call(self._client.aclose)
        self._stack.close()
