"""Celery signatures -> the ``TaskSpec`` of each task of one record.

Routing is the app's own: ``app.amqp.router`` (``task_routes``, ``task_queues``, the
signature's ``queue``, the task's own ``queue``/``priority``/``expires`` attributes), and
the exchange and routing key are chosen as Celery's ``send_task_message`` chooses them,
so a user's existing routes hold. What a record can carry durably is carried (an eta or
countdown becomes an absolute ``eta``, ``expires`` an absolute time, ``priority``,
``headers``); anything else is refused, naming it, before anything is appended.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from celery import Celery
from celery.canvas import Signature
from celery.exceptions import QueueNotFound
from celery.utils.time import maybe_make_aware
from kombu import Exchange, Queue

from .broker import COPY_HEADER
from .errors import NotSerializableError, SendError, UnknownTaskError, UnsupportedOptionError
from .record import TaskSpec

# What a signature's options may hold. Routing is resolved now; timing, priority and
# headers are stored in the record and applied by the pump.
ROUTING = frozenset({"queue", "exchange", "routing_key", "exchange_type"})
CARRIED = frozenset({"countdown", "eta", "expires", "priority", "headers"})
# The pump publishes JSON, persistent: these may only say so.
_ONLY = {"serializer": ("json",), "delivery_mode": (2, "persistent")}
# Task attributes Celery merges into every send that the worker applies by itself.
_WORKER_APPLIES = frozenset({"time_limit", "soft_time_limit"})
# Celery's own message headers (amqp.as_task_v2), and the pump's (which publication a
# message is, that its ack names): a user header must not replace one (``id`` is the
# task id the acks are matched by).
RESERVED_HEADERS = frozenset({
    "lang", "task", "id", "shadow", "eta", "expires", "group", "group_index", "retries",
    "timelimit", "root_id", "parent_id", "argsrepr", "kwargsrepr", "origin",
    "ignore_result", "replaced_task_nesting", "stamped_headers", "stamps", COPY_HEADER,
})  # fmt: skip
# Built once: json.dumps with arguments builds an encoder per call (the same text).
_STRICT = json.JSONEncoder(allow_nan=False, ensure_ascii=False, separators=(",", ":"))
MAX_PRIORITY = 255  # AMQP's bound; Redis uses 0-9 (higher values are clamped by kombu)


def task_specs(app: Celery, signatures: tuple[Any, ...], now: float) -> tuple[TaskSpec, ...]:
    """One TaskSpec per signature, targets "0", "1", ... by position."""
    if not signatures:
        raise SendError("send() needs at least one task signature, e.g. task.s(...)")
    return tuple(task_spec(app, str(i), sig, now) for i, sig in enumerate(signatures))


def arguments_json(specs: tuple[TaskSpec, ...]) -> str:
    """The JSON text of every task's args, kwargs and headers, or NotSerializableError
    naming the first task and part that is not JSON text. The same text again for the
    record decoded from the log (JSON round-trips), so keys.digest can hash it."""
    try:  # one pass over everything; only a failure looks for the culprit
        return _check_json([[t.args, t.kwargs, t.options.get("headers")] for t in specs])
    except NotSerializableError:
        for t in specs:
            where = f"task {t.target} ({t.name})"
            for part in ("args", "kwargs", "headers"):
                value = t.options.get(part) if part == "headers" else getattr(t, part)
                _check_json(value, f"{where}: {part} are")
        raise


def task_spec(app: Celery, target: str, sig: Any, now: float) -> TaskSpec:
    where = f"task {target}"
    name = _plain_signature(sig, where)
    task: Any = app.tasks.get(name)
    if task is None:
        raise UnknownTaskError(
            f"{where}: {name!r} is not a task of app {app.main!r}; import the module that "
            "defines it (include=... or autodiscover_tasks)"
        )
    args, kwargs = list(sig.args or ()), dict(sig.kwargs or {})
    where = f"{where} ({name})"
    options = _options(task, sig.options, where)
    try:
        routed = app.amqp.router.route(dict(options), name, tuple(args), kwargs, task)
    except QueueNotFound as exc:
        raise UnsupportedOptionError(f"{where}: queue: {exc}") from None
    _check_keys(routed, where, "the route of")
    queue, exchange, routing_key = _destination(app, routed, where)
    for part, value in (("queue", queue), ("exchange", exchange), ("routing_key", routing_key)):
        if not isinstance(value, str):
            raise UnsupportedOptionError(f"{where}: {part}={value!r} is not a name")
        try:
            value.encode()
        except UnicodeEncodeError:
            raise UnsupportedOptionError(
                f"{where}: {part} {value!r} holds a lone UTF-16 surrogate: no broker can be told it"
            ) from None
    carried = _carried(app, routed, now, where)
    carried.update(exchange=exchange, routing_key=routing_key)
    return TaskSpec(target, name, queue, args, kwargs, carried)


def _plain_signature(sig: Any, where: str) -> str:
    if not isinstance(sig, Signature):
        raise SendError(f"{where}: {sig!r} is not a task signature; pass task.s(...)")
    kind = sig.subtask_type  # "chain", "group", "chord"; None for one task
    if kind:
        raise UnsupportedOptionError(
            f"{where}: a {kind} cannot be sent durably; send its tasks as separate "
            f"signatures of one send(), or start the {kind} from inside a task"
        )
    name = sig.task
    if not isinstance(name, str) or not name:
        raise SendError(f"{where}: the signature names no task")
    return name


def _options(task: Any, given: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The task's own execution options (as ``apply_async`` merges them), then the
    signature's; None means "not given", as in Celery."""
    options: dict[str, Any] = {}
    for key, value in task._get_exec_options().items():
        if value is not None and key not in _WORKER_APPLIES:
            options[key] = value
    _check_keys(options, where, "the task attributes of")
    caller = {k: v for k, v in (given or {}).items() if v is not None}
    _check_keys(caller, where, "")
    options.update(caller)
    return options


def _check_keys(options: Mapping[str, Any], where: str, source: str) -> None:
    for key, value in options.items():
        if key in ROUTING or key in CARRIED:
            continue
        if key in _ONLY and value in _ONLY[key]:
            continue
        if key in _ONLY:
            raise UnsupportedOptionError(
                f"{where}: {key}={value!r} in {source}the signature: walrelay publishes "
                f"{key}={_ONLY[key][0]!r} only"
            )
        raise UnsupportedOptionError(
            f"{where}: option {key!r} in {source}the signature cannot be carried durably "
            f"(walrelay carries {', '.join(sorted(CARRIED))} and routing); "
            + _ADVICE.get(key, "leave it out")
        )


_ADVICE = {
    "link": "call the next task from inside the task instead",
    "link_error": "handle the failure inside the task instead (the pump retries it)",
    "task_id": "task ids are derived from the WAL and the record; pass key= for idempotency",
    "chord": "send the header tasks in one send() and start the body from a task",
    "chain": "send the first task and start the next from inside it",
    "time_limit": "set time_limit on the task itself (the worker applies it)",
    "soft_time_limit": "set soft_time_limit on the task itself (the worker applies it)",
}


def _destination(app: Celery, routed: Mapping[str, Any], where: str) -> tuple[str, str, str]:
    """(queue name, exchange, routing key), as celery.app.amqp's send_task_message picks
    them: a direct exchange without both an exchange and a routing key given means the
    default exchange and the queue's name."""
    queue = routed.get("queue")
    if isinstance(queue, str):  # a router returned a bare name
        queue = app.amqp.queues[queue]
    if not isinstance(queue, Queue) or not queue.name:
        raise UnsupportedOptionError(f"{where}: no queue: set task_default_queue or a route")
    exchange = routed.get("exchange")
    routing_key = routed.get("routing_key")
    if exchange is not None and not isinstance(exchange, str | Exchange):
        raise UnsupportedOptionError(f"{where}: exchange={exchange!r} is not a name")
    if routing_key is not None and not isinstance(routing_key, str):
        raise UnsupportedOptionError(f"{where}: routing_key={routing_key!r} is not a name")
    exchange_type = routed.get("exchange_type") or getattr(queue.exchange, "type", "direct")
    if (not exchange or not routing_key) and exchange_type == "direct":
        return queue.name, "", queue.name
    if exchange is None:
        exchange = queue.exchange.name or app.amqp.default_exchange.name
        routing_key = routing_key or queue.routing_key or app.conf.task_default_routing_key
    if isinstance(exchange, Exchange):
        exchange = exchange.name
    return queue.name, str(exchange or ""), str(routing_key or queue.name)


def _carried(app: Celery, routed: Mapping[str, Any], now: float, where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    countdown, eta = routed.get("countdown"), routed.get("eta")
    if countdown is not None and eta is not None:
        raise UnsupportedOptionError(f"{where}: give countdown or eta, not both")
    if countdown is not None:
        out["eta"] = _datable(now + _seconds(countdown, "countdown", where), "countdown", where)
    elif eta is not None:
        out["eta"] = _datable(_instant(app, eta, "eta", where), "eta", where)
    expires = routed.get("expires")
    if isinstance(expires, int | float) and not isinstance(expires, bool):
        out["expires"] = _datable(now + _seconds(expires, "expires", where), "expires", where)
    elif expires is not None:
        out["expires"] = _datable(_instant(app, expires, "expires", where), "expires", where)
    priority = routed.get("priority")
    if priority is not None:
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise UnsupportedOptionError(f"{where}: priority={priority!r} is not an integer")
        if not 0 <= priority <= MAX_PRIORITY:
            raise UnsupportedOptionError(f"{where}: priority={priority} is not 0-{MAX_PRIORITY}")
        out["priority"] = priority
    headers = routed.get("headers")
    if headers is not None:
        out["headers"] = _headers(headers, where)
    return out


def _seconds(value: Any, name: str, where: str) -> float:
    try:
        ok = not isinstance(value, bool) and isinstance(value, int | float)
        ok = ok and math.isfinite(value)
    except OverflowError:  # an int too large for a float
        ok = False
    if not ok:
        raise UnsupportedOptionError(f"{where}: {name}={value!r} is not a number of seconds")
    return float(value)


def _datable(at: float, name: str, where: str) -> float:
    """``at`` (unix time) if it is a date the pump and the workers can write (Celery's
    headers carry ISO 8601), else UnsupportedOptionError."""
    try:
        datetime.fromtimestamp(at, tz=UTC)
    except (OverflowError, OSError, ValueError):
        raise UnsupportedOptionError(
            f"{where}: {name} is past what a date can hold (year 9999)"
        ) from None
    return at


def _instant(app: Celery, value: Any, name: str, where: str) -> float:
    """Unix time of a datetime or ISO 8601 string; a naive one is UTC (whatever the app's timezone),
    as Celery's workers read it."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise UnsupportedOptionError(f"{where}: {name}={value!r} is not ISO 8601") from None
    if not isinstance(value, datetime):
        raise UnsupportedOptionError(f"{where}: {name}={value!r} is not a datetime")
    return float(maybe_make_aware(value, app.timezone).timestamp())


def _headers(headers: Any, where: str) -> dict[str, Any]:
    if not isinstance(headers, Mapping) or not all(isinstance(k, str) for k in headers):
        raise UnsupportedOptionError(f"{where}: headers must be a dict with string keys")
    clash = sorted(RESERVED_HEADERS & set(headers))
    if clash:
        raise UnsupportedOptionError(
            f"{where}: headers {clash} are Celery's or walrelay's own message headers; rename them"
        )
    return dict(headers)


def _check_json(value: Any, what: str = "the tasks' arguments are") -> str:
    """JSON text in UTF-8: no NaN or infinity, no type JSON lacks, no lone surrogate
    (json.dumps would write it, and the record could not be encoded)."""
    try:
        text = _STRICT.encode(value)
        text.encode()
        return text
    except (TypeError, ValueError, RecursionError) as exc:  # incl. UnicodeEncodeError
        raise NotSerializableError(f"{what} not JSON: {exc}") from None
