"""The example web app: ``uvicorn tasks.web:app --workers 4``.

POST /purchases answers 201 only once the purchase is fsync'd into the write-ahead log;
the broker is never touched here, so its state never changes an answer. Each worker
process opens its own handle on the shared log on first use (``checkout.wal_for``).

Configuration (read per request, never at import): ``WAL_DIR``, ``WAL_SYNC``,
``WAL_SEGMENT_BYTES``, ``WAL_MAX_BYTES`` for the log, ``LEDGER_URL`` for GET, and
``PROMETHEUS_MULTIPROC_DIR`` for metrics across workers (see ``walrelay.metrics``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Annotated, Any

from fastapi import FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from walrelay.metrics import CONTENT_TYPE_LATEST, FsyncTimingFs, render_web_metrics, web_metrics
from walstore import LogFullError, LogPoisonedError, Options, RecordTooLargeError, Wal, WalError

from . import checkout, web_schema
from .checkout import InvalidPurchaseError
from .web_middleware import BodyLimit, RequestMetrics

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
RETRY_FULL_S = 5  # the pump prunes as acks arrive: space comes back soon
RETRY_FAILED_S = 60  # a poisoned log needs an operator (stop every process, reopen)
LedgerStatus = Callable[[str], Mapping[str, str]]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_number(literal: str) -> int | float:
    """JSON has one number type: ``2.0`` and ``2e0`` are the integer 2 (JSON Schema agrees,
    and JavaScript clients cannot tell them apart), so they reach validate() as ints.
    Exact (Decimal), and only within 2**53, where every client's doubles are exact too."""
    value = float(literal)
    if value.is_integer() and abs(value) <= 2**53:
        exact = Decimal(literal)
        if exact == exact.to_integral_value():
            return int(exact)
    return value


def parse_body(raw: bytes) -> Any:
    """The JSON document in ``raw``, or InvalidPurchaseError("body", ...)."""
    try:
        doc = json.loads(raw, parse_constant=_reject_constant, parse_float=_json_number)
    except RecursionError:
        raise InvalidPurchaseError("body", "JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, int digit limit
        raise InvalidPurchaseError("body", f"not valid JSON: {exc}") from None
    bad = _lone_surrogate_at(doc)
    if bad is not None:
        # Such strings cannot be encoded as UTF-8: the log's entry could not hold them.
        raise InvalidPurchaseError(bad, "string holds an unpaired UTF-16 surrogate")
    return doc


def _lone_surrogate_at(doc: Any) -> str | None:
    """Path of the first string or key that is not valid Unicode text, else None.

    Iterative: the document may be nested as deep as the JSON parser allows."""
    todo: list[tuple[str, Any]] = [("", doc)]
    while todo:
        path, value = todo.pop()
        if isinstance(value, str) and not _encodable(value):
            return path or "body"
        if isinstance(value, dict):
            for key, item in value.items():
                if not _encodable(key):
                    shown = key.encode("utf-8", "backslashreplace").decode()
                    return f"{path}.{shown}" if path else shown
                todo.append((f"{path}.{key}" if path else key, item))
        elif isinstance(value, list):
            todo.extend((f"{path}[{i}]", item) for i, item in enumerate(value))
    return None


def _encodable(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _problem(
    status: int, detail: str, field: str | None = None, retry: int | None = None
) -> JSONResponse:
    headers = {"Retry-After": str(retry)} if retry is not None else None
    return JSONResponse({"detail": detail, "field": field}, status_code=status, headers=headers)


def _wal_unavailable(exc: BaseException) -> JSONResponse:
    if isinstance(exc, LogFullError):
        return _problem(503, str(exc), retry=RETRY_FULL_S)
    log.error("the write-ahead log cannot take appends: %s", exc)
    return _problem(503, f"the write-ahead log is unavailable: {exc}", retry=RETRY_FAILED_S)


def _is_json(content_type: str | None) -> bool:
    """No Content-Type, or a JSON one. Form and text types are refused: they are what a
    cross-site form may post without a CORS preflight."""
    if not content_type:
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _default_ledger_status(purchase_id: str) -> Mapping[str, str]:
    from . import ledger  # SQLAlchemy and LEDGER_URL: only once GET is used

    return ledger.status_of(purchase_id)


def create_app(
    *,
    wal_dir: str | None = None,
    wal: Callable[[], Wal] | None = None,
    ledger_status: LedgerStatus | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """The ASGI app. Opens nothing and reads no environment until a request comes.

    ``wal`` returns the log to append to (default: this process's handle on ``wal_dir``,
    or on ``WAL_DIR``); ``ledger_status`` maps a purchase id to {target: "pending"|"done"}
    (default: ``tasks.ledger.status_of``)."""
    get_wal = wal or _timed_wal(wal_dir)
    get_status = ledger_status or _default_ledger_status
    app = FastAPI(
        title="walpurchase",
        version="0.1.0",
        description="Purchases are committed once fsync'd into a write-ahead log; "
        "a pump then delivers them to the warehouse and finance workers.",
    )
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_middleware(RequestMetrics, router=app.router)  # outermost: counts 413s too
    _add_purchase_routes(app, get_wal, get_status)
    _add_ops_routes(app, get_wal)
    app.add_exception_handler(RequestValidationError, _validation_problem)
    web_schema.install_openapi(app)
    return app


def _timed_wal(wal_dir: str | None) -> Callable[[], Wal]:
    """This process's handle on the log (``checkout.wal_for``), opened with a file layer
    that times each fdatasync for the ``wal_fsync_seconds`` histogram of /metrics.

    The options are built on the first request, not here: the histogram must not exist
    before the log is used (``app`` is created at import), and ``wal_for`` only reads
    them when it opens the log anyway."""
    options: list[Options] = []

    def get() -> Wal:
        if not options:
            options.append(Options.from_env(fs=FsyncTimingFs()))
        return checkout.wal_for(wal_dir, options[0])

    return get


async def _validation_problem(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's own 422s (path parameters) in the same shape as ours: field named."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    if not errors:
        return _problem(422, str(exc))
    loc = [str(part) for part in errors[0].get("loc", ()) if part not in ("path", "query")]
    field = ".".join(loc) or "request"
    return _problem(422, f"{field}: {errors[0].get('msg', 'invalid')}", field)


def _add_purchase_routes(
    app: FastAPI, get_wal: Callable[[], Wal], get_status: LedgerStatus
) -> None:
    def append(clean: dict[str, Any]) -> checkout.Receipt:
        wal = get_wal()
        with web_metrics().append_seconds.time():
            return checkout.record_purchase(clean, wal=wal)

    @app.post(
        "/purchases",
        status_code=201,
        responses=web_schema.POST_RESPONSES,
        openapi_extra=web_schema.PURCHASE_BODY,
    )
    async def create_purchase(request: Request) -> JSONResponse:
        """Record a purchase durably. 201 means it is in the log and will be delivered."""
        if not _is_json(request.headers.get("content-type")):
            return _problem(415, "send the purchase as application/json", "body")
        try:
            # Validate in the event loop (cheap); only valid purchases touch the log.
            clean = checkout.validate(parse_body(await request.body()))
            receipt = await run_in_threadpool(append, clean)
        except InvalidPurchaseError as exc:
            return _problem(422, str(exc), exc.field)
        except RecordTooLargeError as exc:
            return _problem(413, str(exc), "body")
        except (WalError, OSError) as exc:
            return _wal_unavailable(exc)
        return JSONResponse(
            {"purchase_id": receipt.purchase_id, "lsn": receipt.lsn},
            status_code=201,
            headers={"Location": f"/purchases/{receipt.purchase_id}"},
        )

    @app.get("/purchases/{purchase_id}", responses=web_schema.GET_RESPONSES)
    async def get_purchase(
        purchase_id: Annotated[str, Path(pattern=web_schema.ID_PATTERN, max_length=64)],
    ) -> JSONResponse:
        """Whether the warehouse and finance have recorded the purchase yet."""
        try:
            status = await run_in_threadpool(get_status, purchase_id)
        except Exception as exc:  # the ledger is another system: report, do not crash
            log.warning("ledger lookup of %s failed", purchase_id, exc_info=True)
            return _problem(503, f"the ledger cannot be read: {exc}", retry=RETRY_FULL_S)
        states = {t: "done" if status.get(t) == "done" else "pending" for t in _TARGETS}
        return JSONResponse({"purchase_id": purchase_id, **states})


_TARGETS = ("warehouse", "finance")


def _add_ops_routes(app: FastAPI, get_wal: Callable[[], Wal]) -> None:
    def health() -> tuple[int, dict[str, Any]]:
        try:
            wal = get_wal()
            if wal.poisoned:
                raise LogPoisonedError("the log is poisoned by a failed fsync")
        except (WalError, OSError) as exc:
            return 503, {"status": "unavailable", "detail": str(exc)}
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
