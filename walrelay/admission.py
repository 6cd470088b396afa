"""What the pump makes of each task of a record it reads: refuse it (poison: its reason
goes to the dead letters), confirm it at once (expired before it was due), hold it
(its eta is in the future) or publish it; and the message it becomes.

Which tasks may be published at all is the pump's ``Policy``: the pump command allows
the task names its app registers and, when configured, its queues (see
walrelay.policy). The web process has no broker credentials; this is what keeps a
record it wrote from reaching any other task or key.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .broker import TaskMessage
from .record import TaskSpec, task_id

# The reason a task may not be published, or None: e.g. walrelay.policy.TaskPolicy.
Policy = Callable[[TaskSpec], str | None]

READY, HOLD, EXPIRED, REFUSED = "ready", "hold", "expired", "refused"


@dataclass(frozen=True, slots=True)
class TaskOptions:
    eta: float | None = None
    expires: float | None = None
    priority: int | None = None
    headers: dict[str, Any] | None = None
    exchange: str = ""
    routing_key: str = ""


NO_OPTIONS = TaskOptions()


@dataclass(frozen=True, slots=True)
class Decision:
    kind: str  # READY, HOLD, EXPIRED or REFUSED
    eta: float = 0.0  # HOLD: the unix time it is due
    reason: str = ""  # REFUSED: why
    options: TaskOptions = NO_OPTIONS  # checked, unless REFUSED


def _time(options: dict[str, Any], name: str) -> float | None:
    value = options.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"option {name}={value!r} is not a unix time")
    return float(value)


def task_options(spec: TaskSpec) -> TaskOptions:
    """The options of ``spec``, checked; ValueError names a malformed one."""
    o = spec.options
    if not o:
        return NO_OPTIONS
    priority = o.get("priority")
    if priority is not None and (
        isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 255
    ):
        raise ValueError(f"option priority={priority!r} is not an integer from 0 to 255")
    headers = o.get("headers")
    if headers is not None and not isinstance(headers, dict):
        raise ValueError(f"option headers={headers!r} is not an object")
    exchange, routing_key = o.get("exchange") or "", o.get("routing_key") or ""
    if not isinstance(exchange, str) or not isinstance(routing_key, str):
        raise ValueError("options exchange and routing_key must be strings")
    if not exchange and routing_key not in ("", spec.queue):
        # The default exchange routes by name: this would reach another queue.
        raise ValueError(f"routing key {routing_key!r} on the default exchange is not the "
                         f"queue {spec.queue!r}")  # fmt: skip
    return TaskOptions(_time(o, "eta"), _time(o, "expires"), priority, headers, exchange,
                       routing_key)  # fmt: skip


def decide(spec: TaskSpec, policy: Policy | None, wall_now: float) -> Decision:
    try:
        options = task_options(spec)
    except ValueError as exc:
        return Decision(REFUSED, reason=f"bad task options: {exc}")
    reason = policy(spec) if policy is not None else None
    if reason:
        return Decision(REFUSED, reason=reason)
    if options.expires is not None and options.expires <= wall_now:
        return Decision(EXPIRED, options=options)
    if options.eta is not None and options.eta > wall_now:
        return Decision(HOLD, eta=options.eta, options=options)
    return Decision(READY, options=options) if options is not NO_OPTIONS else READY_PLAIN


READY_PLAIN = Decision(READY)


def message_for(
    wal_id: str, identity: int, spec: TaskSpec, copy: str, o: TaskOptions
) -> TaskMessage:
    """The message of one publication (``copy``) of ``spec`` with its checked options."""
    if o is NO_OPTIONS:
        return TaskMessage(task_id(wal_id, identity, spec.target), spec.name, spec.queue,
                           spec.args, spec.kwargs, copy)  # fmt: skip
    exchange, routing_key = o.exchange, o.routing_key
    if exchange == spec.queue and routing_key in ("", spec.queue):
        # Celery's default routing (an exchange named after the queue, bound by name) is
        # the default exchange's: no binding needed before a worker declared one.
        exchange = routing_key = ""
    return TaskMessage(task_id(wal_id, identity, spec.target), spec.name, spec.queue,
                       spec.args, spec.kwargs, copy, o.expires, o.priority,
                       dict(o.headers or {}), exchange, routing_key)  # fmt: skip
