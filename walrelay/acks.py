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

import contextlib
import logging
import os
from typing import Any

from celery import Celery, Task
from celery.signals import task_failure, task_success, task_unknown
from kombu import Connection
from kombu.transport import resolve_transport
from kombu.transport.redis import Transport as RedisTransport

from .broker import COPY_HEADER, Ack, ack_queue, encode_ack
from .record import parse_task_id

logger = logging.getLogger(__name__)

# An ack that cannot be sent is not fatal: the pump re-publishes the task after its ack
# timeout and the effect is idempotent. So retry briefly, then give up.
ACK_RETRY_POLICY = {"max_retries": 3, "interval_start": 0.0, "interval_step": 0.5,
                    "interval_max": 1.0}  # fmt: skip
ACK_TIMEOUT = 10.0  # longest wait for a write or a publisher confirm: never hang a task


def send_ack(app: Celery, ack: Ack, *, raw: bool | None = None) -> None:
    """Publish ``ack`` to the ack queue of its WAL.

    On Redis, plain or Sentinel (``raw`` None picks it), the ack is LPUSHed as plain JSON
    by a client this process keeps on the broker's connection pool (URL, password, TLS,
    Sentinel and key prefix as kombu set them up): ~5x cheaper than a kombu publish, and
    paid once per task. Any other transport gets an ordinary kombu message on a
    connection this process keeps, with heartbeats (see ``_AmqpAcks``)."""
    queue = ack_queue(ack.wal_id)
    if raw is None:
        raw = is_redis(app)
    if raw:
        try:
            _redis_client(app).lpush(queue, encode_ack(ack))
            return
        except Exception as exc:  # drop the client; the kombu path below reconnects
            _clients.pop((os.getpid(), id(app)), None)
            logger.info("raw ack failed (%r); sending it through kombu", exc)
    _kombu_acks(app).send(queue, encode_ack(ack))


_redis_apps: dict[tuple[int, str], bool] = {}


def is_redis(app: Celery) -> bool:
    """True if the app's broker is Redis, plain or Sentinel (kombu's Redis transports)."""
    url = str(app.conf.broker_url or "")
    key = (id(app), url)
    found = _redis_apps.get(key)
    if found is None:
        transport = app.conf.broker_transport or url.split("://", 1)[0]
        cls: Any = None
        with contextlib.suppress(KeyError, ImportError, ValueError):
            cls = resolve_transport(transport)  # the class (the stubs say a str)
        found = _redis_apps[key] = isinstance(cls, type) and issubclass(cls, RedisTransport)
    return found


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


class _AmqpAcks:
    """A connection of this process's own for acks, with the app's ``broker_heartbeat``
    (Celery's producer pool negotiates none, so a dead peer goes unnoticed). Nothing
    runs in the background: before each ack the frames the broker sent meanwhile
    (heartbeats, or its closing of an idle connection) are read and the heartbeat
    checked; a connection found dead is replaced before the ack is published."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.conn: Connection | None = None

    def _connection(self) -> Connection:
        conn = self.conn
        if conn is not None:
            try:
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=0)
                conn.heartbeat_check()
                return conn
            except Exception as exc:  # closed by the broker, or its heartbeats missed
                logger.info("ack connection lost (%r); opening a new one", exc)
                self.close()
        heartbeat = self.app.conf.broker_heartbeat or None
        self.conn = self.app.connection_for_write(heartbeat=heartbeat)
        return self.conn

    def send(self, queue: str, body: str) -> None:
        conn = self._connection()
        producer = conn.Producer(auto_declare=False)
        producer.publish(
            body,
            routing_key=queue,
            exchange="",
            content_type="application/json",
            content_encoding="utf-8",
            delivery_mode=2,
            retry=True,
            retry_policy=ACK_RETRY_POLICY,
            timeout=ACK_TIMEOUT,
            confirm_timeout=ACK_TIMEOUT,
        )

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.release()


_amqp: dict[tuple[int, int], _AmqpAcks] = {}


def _kombu_acks(app: Celery) -> _AmqpAcks:
    key = (os.getpid(), id(app))
    sender = _amqp.get(key)
    if sender is None:
        sender = _amqp[key] = _AmqpAcks(app)
    return sender


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
