"""The real Publisher: Celery protocol-2 task messages published with kombu, acks
drained from the WAL's ack queue.

Why not ``apply_async``: Celery spends ~150 us of CPU per message building and routing
it; the pump builds the same message (headers and JSON body as
``celery.app.amqp.AMQP.as_task_v2`` does) and publishes it on the default exchange with
the queue as routing key, which is exactly where Celery itself sends a task for a direct
queue. Inside ``Producer.batch`` kombu's Redis transport buffers the LPUSHes in one
non-transactional pipeline, so a batch costs one round trip. Workers and Flower see
ordinary tasks.

Acks are JSON on ``walstore.acks.<wal_id>``: on Redis, plain JSON LPUSHed by the workers
(see walrelay.acks) and popped up to ``limit`` at a time (RPOP with a count, Redis >= 6.2);
kombu messages carrying the same JSON are accepted too. On other transports a kombu
Consumer drains ordinary kombu messages.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, cast

from kombu import Connection, Consumer, Producer, Queue
from kombu.exceptions import KombuError
from redis.exceptions import ResponseError

from ..broker import COPY_HEADER, Ack, TaskMessage, ack_queue, decode_ack
from ..errors import BrokerUnavailableError, MessageRejectedError

REPR_CHARS = 1024  # Celery's argsrepr limit: what Flower shows
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
# Redis errors that refuse every write, not one message: an outage, not a poison message.
BROKER_WIDE = frozenset({"OOM", "READONLY", "MISCONF", "NOREPLICAS", "MASTERDOWN", "LOADING",
                         "BUSY", "NOAUTH", "CLUSTERDOWN", "TRYAGAIN"})  # fmt: skip


def task_headers(msg: TaskMessage, origin: str, args_json: str, kwargs_json: str) -> dict[str, Any]:
    """Protocol-2 headers, as ``as_task_v2`` builds them for a plain ``apply_async``, with
    the record's own headers (never overriding these) and the copy's name."""
    expires = None
    if msg.expires is not None:
        expires = datetime.fromtimestamp(msg.expires, tz=UTC).isoformat()
    protocol: dict[str, Any] = {
        "lang": "py",
        "task": msg.name,
        "id": msg.task_id,
        "shadow": None,
        "eta": None,  # held by the pump until due: never a broker ETA (kombu#337)
        "expires": expires,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": msg.task_id,
        "parent_id": None,
        "argsrepr": args_json[:REPR_CHARS],
        "kwargsrepr": kwargs_json[:REPR_CHARS],
        "origin": origin,
        "ignore_result": True,  # the pump learns the outcome from acks, not results
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
        COPY_HEADER: msg.copy,
    }
    return {**msg.headers, **protocol} if msg.headers else protocol


def task_body(msg: TaskMessage) -> tuple[bytes, str, str]:
    """(body, args JSON, kwargs JSON): the body is ``[args, kwargs, embed]`` in UTF-8.
    Raises (UnicodeEncodeError: a lone surrogate) if the message cannot be encoded."""
    args_json = json.dumps(msg.args, separators=(",", ":"), ensure_ascii=False)
    kwargs_json = json.dumps(msg.kwargs, separators=(",", ":"), ensure_ascii=False)
    body = f"[{args_json},{kwargs_json},{json.dumps(_EMBED, separators=(',', ':'))}]"
    if msg.headers:
        json.dumps(msg.headers, ensure_ascii=False).encode()
    return body.encode(), args_json, kwargs_json


def refusal(exc: BaseException) -> str | None:
    """The broker's refusal of one message in ``exc`` (Redis: WRONGTYPE, an ACL on the
    key), or None if it is anything else (a lost connection, a broker refusing all)."""
    seen: set[int] = set()
    err: BaseException | None = exc
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, ResponseError):
            text = str(err)
            code = text.split("caused error: ", 1)[-1].split(" ", 1)[0]
            return None if code in BROKER_WIDE else text
        err = err.__cause__ or err.__context__
    return None


class KombuPublisher:
    """Publisher over a kombu connection made by ``connect`` (the app's broker settings).

    Every failure closes the connection and raises BrokerUnavailableError; the next call
    reconnects (one attempt, no sleeping: the pump paces retries). ``fast_acks`` forces
    (True) or forbids (False) the Redis ack path; None picks it on Redis."""

    def __init__(
        self,
        connect: Callable[[], Connection],
        wal_id: str,
        *,
        origin: str | None = None,
        batch_size: int = 1000,
        fast_acks: bool | None = None,
    ) -> None:
        self._connect = connect
        self.wal_id = wal_id
        self.origin = origin or f"walstore-pump:{os.getpid()}@{socket.gethostname()}"
        self._batch_size = batch_size
        self._fast_acks = fast_acks
        self._queue_name = ack_queue(wal_id)
        self._conn: Connection | None = None
        self._channel: Any = None
        self._producer: Producer | None = None
        self._consumer: Consumer | None = None
        self._buffer: list[Ack] = []
        self._client: Any = None
        self._connects = 0

    # ---------------------------------------------------------------- connection
    def _errors(self, conn: Connection) -> tuple[type[BaseException], ...]:
        return (*conn.connection_errors, *conn.channel_errors, KombuError, OSError)

    def _ensure(self) -> Any:
        if self._conn is not None:
            return self._channel
        conn = self._connect()
        try:
            conn.ensure_connection(max_retries=0)
            channel = conn.channel()
            queue = Queue(self._queue_name, routing_key=self._queue_name, durable=True)
            queue(channel).declare()
            if self._fast_acks is None:
                self._fast_acks = conn.transport.driver_type == "redis"
            if not self._fast_acks:
                self._consumer = Consumer(
                    channel, [queue], callbacks=[self._on_message], no_ack=True, accept=["json"]
                )
                self._consumer.consume()
        except BaseException as exc:
            self._safe_close(conn)
            if isinstance(exc, self._errors(conn)):
                raise BrokerUnavailableError(f"cannot reach {conn.as_uri()}: {exc}") from exc
            raise
        self._conn, self._channel = conn, channel
        self._producer = Producer(channel, auto_declare=False)
        self._connects += 1
        return channel

    def _fail(self, exc: BaseException, what: str) -> BrokerUnavailableError:
        uri = self._conn.as_uri() if self._conn is not None else "broker"
        self.close()
        return BrokerUnavailableError(f"{what} failed on {uri}: {exc!r}")

    def _safe_close(self, conn: Connection) -> None:
        # The connection is already broken or unwanted: nothing in it is worth an error.
        with contextlib.suppress(Exception):
            conn.release()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        self._channel = self._producer = self._consumer = self._client = None
        if conn is not None:
            self._safe_close(conn)

    # ---------------------------------------------------------------- publishing
    def publish(self, messages: Sequence[TaskMessage]) -> None:
        self._ensure()
        assert self._conn is not None and self._producer is not None
        producer, origin = self._producer, self.origin
        refused: dict[int, str] = {}
        try:
            # Producer.batch is new in kombu 5.7 (the stubs do not know it yet).
            with cast(Any, producer).batch(self._batch_size):
                for i, msg in enumerate(messages):
                    try:
                        body, args_json, kwargs_json = task_body(msg)
                    except (UnicodeError, ValueError, TypeError, RecursionError) as exc:
                        refused[i] = f"cannot encode the message: {exc!r}"
                        continue
                    producer.publish(
                        body,
                        routing_key=msg.routing_key or msg.queue,
                        exchange=msg.exchange,
                        content_type="application/json",
                        content_encoding="utf-8",
                        headers=task_headers(msg, origin, args_json, kwargs_json),
                        priority=msg.priority or 0,  # 0: the transport's default
                        delivery_mode=2,
                        correlation_id=msg.task_id,
                        reply_to="",
                    )
        except self._errors(self._conn) as exc:
            why = refusal(exc)
            if why is None:
                raise self._fail(exc, "publish") from exc
            # The broker answered: the connection is fine, a message (which one a
            # pipeline does not say) is not.
            raise MessageRejectedError(f"the broker refused a message: {why}") from exc
        if refused:
            raise MessageRejectedError(f"{len(refused)} message(s) cannot be encoded", refused)

    # ---------------------------------------------------------------- acks
    def drain_acks(self, timeout: float, limit: int = 1000) -> list[Ack]:
        channel = self._ensure()
        assert self._conn is not None
        try:
            if self._fast_acks:
                return self._drain_redis(channel, timeout, limit)
            return self._drain_consumer(timeout, limit)
        except self._errors(self._conn) as exc:
            raise self._fail(exc, "receiving acks") from exc

    def _drain_redis(self, channel: Any, timeout: float, limit: int) -> list[Ack]:
        # Polling, not BRPOP: one round trip collects every ack that arrived meanwhile,
        # so a busy pump pays per batch instead of per ack, and an idle one one round
        # trip per ``timeout``. Acks only move the low water mark: a few ms of delay on
        # them costs nothing that matters.
        if timeout > 0:
            time.sleep(timeout)
        items = self._redis().rpop(self._queue_name, limit) or []
        out = []
        for raw in items:
            ack = self._decode_raw(channel, raw)
            if ack is not None:
                out.append(ack)
        return out

    def _redis(self) -> Any:
        """A Redis client on the channel's pool, kept for the connection's life (kombu's
        ``conn_or_acquire`` builds a new client object on every call)."""
        if self._client is None:
            with self._channel.conn_or_acquire() as client:
                self._client = client
        return self._client

    def _decode_raw(self, channel: Any, raw: bytes) -> Ack | None:
        """A plain JSON ack (what workers LPUSH on Redis) or a kombu message holding one."""
        try:
            doc = json.loads(raw)
            if "wal_id" in doc:
                return decode_ack(doc)
            message = channel.Message(doc, channel=channel)
        except (ValueError, KeyError, TypeError):
            return None
        if message.content_type != "application/json":
            return None  # JSON only: never let kombu deserialise anything else
        return decode_ack(message.body)

    def _on_message(self, body: Any, message: Any) -> None:
        ack = decode_ack(body) if isinstance(body, dict) else None
        if ack is not None:
            self._buffer.append(ack)

    def _drain_consumer(self, timeout: float, limit: int) -> list[Ack]:
        assert self._conn is not None
        deadline = time.monotonic() + timeout
        wait = timeout
        while len(self._buffer) < limit:
            try:
                self._conn.drain_events(timeout=max(wait, 0.0001))
            except TimeoutError:
                break
            wait = min(0.001, deadline - time.monotonic())
        out, self._buffer = self._buffer[:limit], self._buffer[limit:]
        return out

    # ---------------------------------------------------------------- sessions
    def session(self) -> str:
        self._ensure()
        assert self._conn is not None
        if self._conn.transport.driver_type != "redis":
            return f"connection:{self._connects}"
        try:
            run_id = self._redis().info("server")["run_id"]
        except self._errors(self._conn) as exc:
            raise self._fail(exc, "INFO server") from exc
        # A Redis without persistence restarts empty: a new run_id means every queued
        # task and ack is gone, even if the client reconnected transparently.
        return f"{run_id}:{self._connects}"
