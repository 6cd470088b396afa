"""Worker side of the acks: task_success / task_failure handlers that tell the pump of
the task's WAL how a delivery went, through the broker (workers may run on other hosts).

Only tasks whose id was made by ``walrelay.record.task_id`` are acked; any other task of
the app (sent with ``.delay()``) is left alone. Each ack names the copy it confirms (the
message's ``walrelay_copy`` header), so that the pump knows how far the queue got. A
task this worker does not know (Celery's ``task_unknown``: it sends no failure) is acked
as failed, so the pump dead-letters it after its attempts instead of waiting forever.

The handlers run in the process that ran the task (a prefork child), so the cost is
spread over the pool, not paid by the worker's parent process, which is the usual
bottleneck.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery, Task
from celery.signals import task_failure, task_success, task_unknown

from .broker import COPY_HEADER, Ack, ack_queue, encode_ack
from .record import parse_task_id

logger = logging.getLogger(__name__)

# An ack that cannot be sent is not fatal: the pump re-publishes the task after its ack
# timeout and the effect is idempotent. So retry briefly, then give up.
ACK_RETRY_POLICY = {"max_retries": 3, "interval_start": 0.0, "interval_step": 0.5,
                    "interval_max": 1.0}  # fmt: skip


def send_ack(app: Celery, ack: Ack, *, raw: bool | None = None) -> None:
    """Publish ``ack`` to the ack queue of its WAL.

    On Redis (``raw`` None picks it) the ack is LPUSHed as plain JSON by a client this
    process keeps on the broker's connection pool (URL, password, TLS and key prefix as
    kombu set them up): ~5x cheaper than a kombu publish, and paid once per task. Any
    other transport gets an ordinary kombu message from the app's producer pool."""
    queue = ack_queue(ack.wal_id)
    if raw is None:
        raw = str(app.conf.broker_url or "").split(":", 1)[0] in ("redis", "rediss")
    if raw:
        try:
            _redis_client(app).lpush(queue, encode_ack(ack))
            return
        except Exception as exc:  # drop the client; the kombu path below reconnects
            _clients.pop((os.getpid(), id(app)), None)
            logger.info("raw ack failed (%r); sending it through kombu", exc)
    with app.producer_pool.acquire(block=True, timeout=10) as producer:
        producer.publish(
            encode_ack(ack),
            routing_key=queue,
            exchange="",
            content_type="application/json",
            content_encoding="utf-8",
            delivery_mode=2,
            retry=True,
            retry_policy=ACK_RETRY_POLICY,
        )


_clients: dict[tuple[int, int], Any] = {}


def _redis_client(app: Celery) -> Any:
    """This process's Redis client for acks (keyed by pid: never used across a fork)."""
    key = (os.getpid(), id(app))
    client = _clients.get(key)
    if client is None:
        conn = app.connection_for_write()
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=1)
        channel: Any = conn.channel()
        with channel.conn_or_acquire() as client:
            _clients[key] = client
    return client


def _send(app: Celery | None, task_id: str | None, ok: bool, error: str | None, copy: Any) -> None:
    parsed = parse_task_id(task_id) if task_id else None
    if parsed is None or app is None or id(app) not in _bound:
        return
    wal_id, lsn, target = parsed
    try:
        send_ack(app, Ack(wal_id, lsn, target, ok, error, copy if isinstance(copy, str) else None))
    except Exception as exc:
        logger.warning("could not ack %s (the pump will re-send it): %r", task_id, exc)


def _copy(task: Task[Any, Any]) -> Any:
    """The copy header of the message ``task`` is running (None if it has none)."""
    request = task.request
    headers = getattr(request, "headers", None) or {}
    return headers.get(COPY_HEADER) or getattr(request, COPY_HEADER, None)


def on_task_success(sender: Task[Any, Any] | None = None, **_: Any) -> None:
    if sender is not None:
        _send(sender.app, sender.request.id, True, None, _copy(sender))


def on_task_failure(
    sender: Task[Any, Any] | None = None,
    task_id: str | None = None,
    exception: BaseException | None = None,
    **_: Any,
) -> None:
    if sender is not None:
        _send(sender.app, task_id, False, repr(exception), _copy(sender))


def on_task_unknown(
    sender: Any = None, message: Any = None, name: str | None = None, id: str | None = None,
    **_: Any,
) -> None:  # fmt: skip
    headers = getattr(message, "headers", None) or {}
    error = f"NotRegistered({name!r}): no such task on worker {getattr(sender, 'hostname', '?')}"
    _send(getattr(sender, "app", None), id, False, error, headers.get(COPY_HEADER))


_bound: set[int] = set()  # ids of the apps whose tasks are acked


def install(app: Celery) -> None:
    """Ack the tasks of ``app`` (idempotent: the dispatch uids make a second call a
    no-op; tasks of other apps in the same process are left alone)."""
    _bound.add(id(app))
    task_success.connect(on_task_success, weak=False, dispatch_uid="walstore-ack-success")
    task_failure.connect(on_task_failure, weak=False, dispatch_uid="walstore-ack-failure")
    task_unknown.connect(on_task_unknown, weak=False, dispatch_uid="walrelay-ack-unknown")
