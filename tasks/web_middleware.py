"""Pure ASGI middleware of the web app: a request body cap and deadline, and request
counting.

Pure ASGI (not Starlette's BaseHTTPMiddleware) so the body is never read twice and
exceptions reach Starlette's error handling unchanged."""

from __future__ import annotations

import json
import logging

import anyio
from starlette.routing import Match, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from walrelay import web_metrics

log = logging.getLogger(__name__)
_warned: list[str] = []


def _warn_once(exc: BaseException) -> None:
    """Requests are not counted while metrics are misconfigured: said once, not per request."""
    if not _warned:
        _warned.append(str(exc))
        log.error("requests are not counted: %s", exc)


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server rejects these; count the bytes anyway
    return None


async def send_json(
    send: Send, status: int, doc: object, headers: list[tuple[bytes, bytes]]
) -> None:
    body = json.dumps(doc).encode()
    head = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *headers,
    ]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


# Any other method a client makes up counts as "other": labels must stay bounded.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class BodyLimit:
    """Answers 413 to any request whose body is over ``limit`` bytes, and 408 to one whose
    body has not fully arrived within ``timeout`` seconds (a client trickling a body in
    would otherwise hold the connection and a worker slot for as long as it likes), before
    the app runs.

    Checks Content-Length first, then counts what arrives, so chunked bodies and bodies
    without a Content-Length are capped too. The (small) body is buffered and handed to
    the app in one message."""

    # Read and drop up to this much of an over-size body before answering, so that the
    # close does not reset the connection under a client still sending (a TCP reset can
    # discard the 413 before the client reads it). Past it, answer and close at once.
    DRAIN_BYTES = 1024 * 1024

    def __init__(self, app: ASGIApp, limit: int, timeout: float = 10.0) -> None:
        self.app = app
        self.limit = limit
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body: bytes | None = None
        with anyio.move_on_after(self.timeout) as deadline:
            body = await self._read(scope, receive, send)
        if deadline.cancelled_caught:
            detail = {"detail": f"request body not received within {self.timeout:g} s",
                      "field": "body"}  # fmt: skip
            await send_json(send, 408, detail, [(b"connection", b"close")])
            return
        if body is None:
            return  # answered (413), or the client went away
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        declared = _declared_length(scope)
        if declared is not None and declared > self.limit:
            drained = declared <= self.limit + self.DRAIN_BYTES and await self._drain(receive, 0)
            await self._too_large(send, drained)
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None  # the client went away: nobody to answer
            chunk = message.get("body", b"")
            more = bool(message.get("more_body", False))
            size += len(chunk)
            if size > self.limit:
                drained = not more or await self._drain(receive, size)
                await self._too_large(send, drained)
                return None
            chunks.append(chunk)
            if not more:
                return b"".join(chunks)

    async def _drain(self, receive: Receive, size: int) -> bool:
        """Drop the rest of the body; True if it ended within DRAIN_BYTES."""
        while size <= self.limit + self.DRAIN_BYTES:
            message = await receive()
            if message["type"] == "http.disconnect":
                return False
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                return True
        return False

    async def _too_large(self, send: Send, drained: bool) -> None:
        detail = {"detail": f"request body over {self.limit} bytes", "field": "body"}
        # An undrained body is still on its way: the connection cannot be reused.
        await send_json(send, 413, detail, [] if drained else [(b"connection", b"close")])


def _replay(body: bytes, receive: Receive) -> Receive:
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if delivered:
            return await receive()  # only a disconnect can come now
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


class RequestMetrics:
    """Counts answered requests by method, route template (bounded cardinality) and status."""

    def __init__(self, app: ASGIApp, router: Router | None = None) -> None:
        self.app = app
        self.router = router  # to name the route of requests answered before routing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = "none"  # the client went away before an answer

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, capture)
        except Exception:
            if status == "none":
                status = "500"  # Starlette's outermost handler answers it so
            raise
        finally:
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"
            try:
                web_metrics().requests.labels(method, self._route(scope), status).inc()
            except ValueError as exc:  # a metrics setting (its answer says it): not the request's
                _warn_once(exc)

    def _route(self, scope: Scope) -> str:
        route = scope.get("route")
        if route is None and self.router is not None:
            route = next((r for r in self.router.routes if r.matches(scope)[0] != Match.NONE), None)
        return getattr(route, "path", None) or "unmatched"
