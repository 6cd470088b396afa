"""The example web app: ``uvicorn tasks.web:app --workers 4``.

POST /purchases answers 201 only once the purchase is fsync'd into the write-ahead log
(``relay.send``); the broker is never touched here, so its state never changes an answer.
The purchase id is the idempotency key: the same purchase again answers the first 201,
another purchase under that id 409. Each worker process opens its own handle on the
shared log on first use.

Configuration (read on the first request, never at import): the example app's
(``tasks.app.get_app``: ``WAL_DIR``, ``WAL_SYNC``, ``WAL_SEGMENT_BYTES``,
``WAL_MAX_BYTES``, ...), ``LEDGER_URL`` for GET, and ``PROMETHEUS_MULTIPROC_DIR`` for
metrics across workers (see walrelay's ``render_web_metrics``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Annotated, Any

from fastapi import FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from walrelay import (
    DuplicateKeyError,
    KeyIndexError,
    LogFullError,
    LogPoisonedError,
    RecordTooLargeError,
    Relay,
    SendError,
    WalError,
    render_web_metrics,
    web_metrics,
)

from . import web_schema
from .checkout import PurchaseReceipt, send_purchase
from .purchase import ID_PATTERN, InvalidPurchaseError, validate
from .targets import TARGETS
from .web_body import is_json, parse_body
from .web_middleware import BodyLimit, RequestMetrics

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
BODY_TIMEOUT_S = 10.0  # to receive a whole body: a client trickling it in holds a worker
RETRY_FULL_S = 5  # the pump prunes as acks arrive: space comes back soon
RETRY_FAILED_S = 60  # a poisoned log needs an operator (stop every process, reopen)
LedgerStatus = Callable[[str], Mapping[str, str]]


def _problem(
    status: int, detail: str, field: str | None = None, retry: int | None = None
) -> JSONResponse:
    headers = {"Retry-After": str(retry)} if retry is not None else None
    return JSONResponse({"detail": detail, "field": field}, status_code=status, headers=headers)


def _wal_unavailable(exc: BaseException) -> JSONResponse:
    if isinstance(exc, LogFullError):
        return _problem(503, str(exc), retry=RETRY_FULL_S)
    if isinstance(exc, KeyIndexError):  # the message says what to do
        log.error("the idempotency index cannot be used: %s", exc)
        return _problem(503, str(exc), retry=RETRY_FAILED_S)
    log.error("the write-ahead log cannot take appends: %s", exc)
    return _problem(503, f"the write-ahead log is unavailable: {exc}", retry=RETRY_FAILED_S)


def _misconfigured(exc: BaseException) -> JSONResponse:
    log.error("the web app is misconfigured: %s", exc)
    return _problem(503, f"the web app is misconfigured: {exc}", retry=RETRY_FAILED_S)


def _default_relay() -> Relay:
    from .app import get_app  # the Celery app and its settings: only on the first request

    return get_app().relay


def _default_ledger_status(purchase_id: str) -> Mapping[str, str]:
    from . import ledger  # SQLAlchemy and LEDGER_URL: only once GET is used

    return ledger.status_of(purchase_id)


def create_app(
    *,
    relay: Callable[[], Relay] | None = None,
    ledger_status: LedgerStatus | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    body_timeout: float = BODY_TIMEOUT_S,
) -> FastAPI:
    """The ASGI app. Opens nothing and reads no environment until a request comes.

    ``relay`` returns the relay to send with (default: the example app's, created on
    first use from the environment); ``ledger_status`` maps a purchase id to {target:
    "pending"|"done"} (default: ``tasks.ledger.status_of``). A body not received within
    ``body_timeout`` seconds is answered 408 and its connection closed."""
    get_relay = relay or _default_relay
    get_status = ledger_status or _default_ledger_status
    app = FastAPI(
        title="walpurchase",
        version="0.1.0",
        description="Purchases are committed once fsync'd into a write-ahead log; "
        "a pump then delivers them to the warehouse and finance workers.",
    )
    app.add_middleware(BodyLimit, limit=max_body_bytes, timeout=body_timeout)
    app.add_middleware(RequestMetrics, router=app.router)  # outermost: counts 413s too
    _add_purchase_routes(app, get_relay, get_status)
    _add_ops_routes(app, get_relay)
    app.add_exception_handler(RequestValidationError, _validation_problem)
    web_schema.install_openapi(app)
    return app


async def _validation_problem(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's own 422s (path parameters) in the same shape as ours: field named."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    if not errors:
        return _problem(422, str(exc))
    loc = [str(part) for part in errors[0].get("loc", ()) if part not in ("path", "query")]
    field = ".".join(loc) or "request"
    return _problem(422, f"{field}: {errors[0].get('msg', 'invalid')}", field)


def _add_purchase_routes(
    app: FastAPI, get_relay: Callable[[], Relay], get_status: LedgerStatus
) -> None:
    def send(clean: dict[str, Any]) -> PurchaseReceipt:
        relay = get_relay()
        with web_metrics().append_seconds.time():
            return send_purchase(clean, relay)

    @app.post(
        "/purchases",
        status_code=201,
        responses=web_schema.POST_RESPONSES,
        openapi_extra=web_schema.PURCHASE_BODY,
    )
    async def create_purchase(request: Request) -> JSONResponse:
        """Record a purchase durably. 201 means it is in the log and will be delivered."""
        if not is_json(request.headers.get("content-type")):
            return _problem(415, "send the purchase as application/json (UTF-8)", "body")
        try:
            # Validate in the event loop (cheap); only valid purchases touch the log.
            clean = validate(parse_body(await request.body()))
            receipt = await run_in_threadpool(send, clean)
        except InvalidPurchaseError as exc:
            return _problem(422, str(exc), exc.field)
        except DuplicateKeyError:
            detail = "purchase_id: another purchase was recorded under this id"
            return _problem(409, detail, "purchase_id")
        except SendError as exc:  # validate() lets nothing through that send refuses
            return _problem(422, f"body: {exc}", "body")
        except RecordTooLargeError as exc:
            return _problem(413, str(exc), "body")
        except (WalError, OSError, KeyIndexError) as exc:
            return _wal_unavailable(exc)
        except ValueError as exc:  # what is left: a bad setting, read on the first request
            return _misconfigured(exc)
        return JSONResponse(
            {"purchase_id": receipt.purchase_id, "lsn": receipt.lsn},
            status_code=201,
            headers={"Location": f"/purchases/{receipt.purchase_id}"},
        )

    @app.get("/purchases/{purchase_id}", responses=web_schema.GET_RESPONSES)
    async def get_purchase(
        purchase_id: Annotated[str, Path(pattern=ID_PATTERN, max_length=64)],
    ) -> JSONResponse:
        """Whether the warehouse and finance have recorded the purchase yet."""
        try:
            status = await run_in_threadpool(get_status, purchase_id)
        except Exception as exc:  # the ledger is another system: report, do not crash
            log.warning("ledger lookup of %s failed", purchase_id, exc_info=True)
            return _problem(503, f"the ledger cannot be read: {exc}", retry=RETRY_FULL_S)
        states = {t: "done" if status.get(t) == "done" else "pending" for t in TARGETS}
        return JSONResponse({"purchase_id": purchase_id, **states})


def _add_ops_routes(app: FastAPI, get_relay: Callable[[], Relay]) -> None:
    def get_wal() -> Any:
        return get_relay().wal()

    def health() -> tuple[int, dict[str, Any]]:
        try:
            wal = get_wal()
            if wal.poisoned:
                raise LogPoisonedError("the log is poisoned by a failed fsync")
        except (WalError, OSError) as exc:
            return 503, {"status": "unavailable", "detail": str(exc)}
        except ValueError as exc:  # a bad setting
            return 503, {"status": "unavailable", "detail": f"misconfigured: {exc}"}
        return 200, {"status": "ok", "wal_id": wal.wal_id}

    @app.get("/healthz", responses=web_schema.HEALTH_RESPONSES)
    async def healthz() -> JSONResponse:
        """200 if this worker can append to the log, else 503."""
        code, doc = await run_in_threadpool(health)
        return JSONResponse(doc, status_code=code)

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text."}},
    )
    async def metrics() -> Response:
        """Prometheus metrics: requests, append latency, WAL gauges."""
        body = await run_in_threadpool(render_web_metrics, get_wal)
        return Response(body, media_type=CONTENT_TYPE_LATEST)


app = create_app()
