"""The real Publisher: Celery protocol-2 task messages published with kombu, acks
drained from the WAL's ack queue.

Why not ``apply_async``: Celery spends ~150 us of CPU per message routing and publishing
it one at a time. The pump builds each message with the app's own ``as_task_v2`` (see
``walrelay.brokers.messages``: signals and Flower's ``task-sent`` events included) and
publishes it on the default exchange with the queue as routing key, exactly where Celery
itself sends a task for a direct queue, after declaring that queue as the app's worker
declares it (so nothing is published into the void). Per transport:

- Redis (plain and Sentinel): inside ``Producer.batch`` kombu buffers the LPUSHes in one
  non-transactional pipeline, so a batch costs one round trip.
- AMQP (RabbitMQ): publisher confirms for the whole batch at once (``confirms.py``), and
  ``mandatory``: a message the broker cannot route comes back and is published again
  once its queue is declared again.

Whether queued messages survived a reconnection is read from a marker left in the broker
(``markers.py``), so a broker that kept its queues is not sent the window again. Workers
and Flower see ordinary tasks.

Acks are JSON on ``walstore.acks.<wal_id>``: on Redis, plain JSON LPUSHed by the workers
(see walrelay.acks) and popped up to ``limit`` at a time (RPOP with a count, Redis >= 6.2);
kombu messages carrying the same JSON are accepted too. On other transports a kombu
Consumer drains ordinary kombu messages.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, cast

from celery import Celery
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.exceptions import KombuError
from redis.exceptions import ResponseError

from ..broker import COPY_HEADER, Ack, TaskMessage, ack_queue, decode_ack
from ..errors import BrokerUnavailableError, MessageRejectedError
from .confirms import ConfirmError, Confirms, Returned
from .markers import AmqpMarker, RedisMarker
from .messages import CeleryMessages, Outgoing

logger = logging.getLogger("walrelay.pump")

REPR_CHARS = 1024  # Celery's argsrepr limit: what Flower shows
ACK_PREFETCH = 10_000  # AMQP: acks delivered ahead of the pump's reading them
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


def _encodable(name: str) -> bool:
    try:
        name.encode()
    except UnicodeError:
        return False
    return True


def task_body(msg: TaskMessage) -> tuple[bytes, str, str]:
    """(body, args JSON, kwargs JSON): the body is ``[args, kwargs, embed]`` in UTF-8.
    Raises (UnicodeEncodeError: a lone surrogate) if the message cannot be encoded."""
    args_json = json.dumps(msg.args, separators=(",", ":"), ensure_ascii=False)
    kwargs_json = json.dumps(msg.kwargs, separators=(",", ":"), ensure_ascii=False)
    body = f"[{args_json},{kwargs_json},{json.dumps(_EMBED, separators=(',', ':'))}]"
    if msg.headers:
        json.dumps(msg.headers, ensure_ascii=False).encode()
    return body.encode(), args_json, kwargs_json


def check_encodable(msg: TaskMessage) -> None:
    """Raise (UnicodeEncodeError: a lone surrogate) if ``msg`` cannot be encoded."""
    task_body(msg)


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
    reconnects (one attempt, no sleeping: the pump paces retries). ``app``: build messages
    with Celery (``for_app`` passes it), declare the queues the app's router names, and
    declare the publisher's own queues as the app's (quorum if its default queue type
    is); without it messages are hand-built and queues declared as plain durable ones.
    ``fast_acks`` forces (True) or forbids (False) the Redis ack path; None picks it on
    Redis."""

    def __init__(
        self,
        connect: Callable[[], Connection],
        wal_id: str,
        *,
        app: Celery | None = None,
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
        self._app = app
        self._messages = CeleryMessages(app, self.origin) if app is not None else None
        self._queue_args = own_queue_arguments(app)
        self._conn: Connection | None = None
        self._channel: Any = None
        self._producer: Producer | None = None
        self._consumer: Consumer | None = None
        self._confirms: Confirms | None = None
        self._marker: RedisMarker | AmqpMarker | None = None
        self._redis_marker = RedisMarker(wal_id)
        self._amqp_marker = AmqpMarker(wal_id, self._queue_args)
        self._declared: set[str] = set()
        self._buffer: list[Ack] = []
        self._last_tag: int | None = None
        self._client: Any = None
        self._connects = 0
        self._epoch = 0  # counts the losses the markers saw: the session token
        self.unroutable = 0  # messages returned twice by the broker (never queued)
        self._refused: dict[int, str] = {}  # by position in the batch being published

    @classmethod
    def for_app(cls, app: Celery, wal_id: str, **kwargs: Any) -> KombuPublisher:
        """The pump's publisher for ``app``: its broker settings, with the app's
        ``broker_heartbeat`` on the connection (Celery gives producers none)."""
        heartbeat = app.conf.broker_heartbeat or None
        connect = functools.partial(app.connection_for_write, heartbeat=heartbeat)
        return cls(connect, wal_id, app=app, **kwargs)

    @property
    def connection(self) -> Connection | None:
        """The current connection (None while disconnected)."""
        return self._conn

    # ---------------------------------------------------------------- connection
    def _errors(self, conn: Connection) -> tuple[type[BaseException], ...]:
        return (*conn.connection_errors, *conn.channel_errors, KombuError, OSError,
                ConfirmError)  # fmt: skip

    def _ensure(self) -> Any:
        if self._conn is not None:
            return self._channel
        conn = self._connect()
        try:
            conn.ensure_connection(max_retries=0)
            self._open(conn)
        except BaseException as exc:
            self.close()
            self._safe_close(conn)
            if isinstance(exc, self._errors(conn)):
                raise BrokerUnavailableError(f"cannot reach {conn.as_uri()}: {exc}") from exc
            raise
        return self._channel

    def _open(self, conn: Connection) -> None:
        """Channel, confirms, ack queue and consumer, marker: a usable session."""
        driver = conn.transport.driver_type
        channel: Any = conn.channel()
        self._conn, self._channel = conn, channel
        self._connects += 1
        self._declared.clear()
        self._confirms = Confirms(channel) if driver == "amqp" else None
        queue = Queue(self._queue_name, routing_key=self._queue_name, durable=True,
                      queue_arguments=self._queue_args)  # fmt: skip
        queue(channel).declare()
        if self._fast_acks is None:
            self._fast_acks = driver == "redis"
        if not self._fast_acks:
            if driver == "amqp":
                channel.basic_qos(0, ACK_PREFETCH, False)
            self._consumer = Consumer(
                channel, [queue], callbacks=[self._on_message], no_ack=False, accept=["json"]
            )
            self._consumer.consume()
        self._producer = Producer(channel, auto_declare=False)
        if self._messages is not None:
            self._messages.bind(conn)
        self._marker = None
        if driver == "redis":
            self._redis_marker.bind(self._redis())
            self._marker = self._redis_marker
        elif self._confirms is not None:
            self._amqp_marker.bind(channel, self._wait_confirms, conn.channel)
            self._marker = self._amqp_marker
        self._look()

    def _look(self) -> None:
        """Check the marker: a broker that lost it lost our messages (a new session)."""
        if self._marker is not None and not self._marker.check():
            self._lost("its session marker is gone")

    def _lost(self, why: str) -> None:
        self._epoch += 1
        logger.warning("pump: the broker lost what was queued (%s)", why)

    def _wait_confirms(self) -> list[Returned]:
        assert self._confirms is not None and self._conn is not None
        return self._confirms.wait(self._conn.drain_events)

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
        self._confirms = self._marker = None
        self._buffer, self._last_tag = [], None  # unacked: the broker delivers them again
        if conn is not None:
            self._safe_close(conn)

    # ---------------------------------------------------------------- publishing
    def publish(self, messages: Sequence[TaskMessage]) -> None:
        if not messages:
            return
        self._ensure()
        assert self._conn is not None and self._producer is not None
        self._refused = {}
        try:
            # A name that cannot be encoded is that message's refusal (``_prepare``),
            # not a failed declare that would fail the whole batch.
            self._declare({msg.queue for msg in messages if _encodable(msg.queue)})
            if self._confirms is not None:
                self._publish_confirmed(messages)
            else:
                self._publish_batch(messages)
            if self._marker is not None and not self._marker.advance():
                self._lost("its session marker moved behind our back")
        except self._errors(self._conn) as exc:
            why = refusal(exc)
            if why is None:
                raise self._fail(exc, "publish") from exc
            # The broker answered: the connection is fine, a message (which one a
            # pipeline does not say) is not.
            raise MessageRejectedError(f"the broker refused a message: {why}") from exc
        refused, self._refused = self._refused, {}
        if refused:
            raise MessageRejectedError(f"{len(refused)} message(s) cannot be encoded", refused)

    def _publish_batch(self, messages: Sequence[TaskMessage]) -> None:
        producer = self._producer
        assert producer is not None
        # Producer.batch is new in kombu 5.7 (the stubs do not know it yet).
        with cast(Any, producer).batch(self._batch_size):
            sent = [self._put_or_refuse(producer, i, msg) for i, msg in enumerate(messages)]
        self._published(sent)

    def _publish_confirmed(self, messages: Sequence[TaskMessage]) -> None:
        producer = self._producer
        assert producer is not None
        sent = [
            self._put_or_refuse(producer, i, msg, mandatory=True) for i, msg in enumerate(messages)
        ]
        returned = self._wait_confirms()
        if returned:
            self._publish_returned(messages, returned)
        self._published(sent)

    def _publish_returned(self, messages: Sequence[TaskMessage], returned: list[Returned]) -> None:
        """Messages the broker could not route: their queue went away (deleted, or the
        broker lost it) since we declared it. Declare again and publish them once more;
        a message returned twice is logged and left to the pump's ack timeout."""
        producer = self._producer
        assert producer is not None
        by_id = {msg.task_id: msg for msg in messages}
        again = [by_id[r.correlation_id] for r in returned if r.correlation_id in by_id]
        self._declared.difference_update(msg.queue for msg in again)
        self._declare({msg.queue for msg in again})
        for msg in again:
            self._put(producer, msg, mandatory=True, event=False)
        twice = self._wait_confirms()
        if twice:
            self.unroutable += len(twice)
            logger.error("pump: the broker cannot route %d message(s), e.g. to queue %r (%s); "
                         "they are sent again after the ack timeout", len(twice),
                         twice[0].routing_key, twice[0].reply_text)  # fmt: skip

    def _put_or_refuse(
        self, producer: Producer, i: int, msg: TaskMessage, *, mandatory: bool = False
    ) -> Outgoing | None:
        """``_put``, or, for a message that cannot be encoded (a lone surrogate), its
        refusal by position: the others of the batch are published all the same."""
        try:
            ready = self._prepare(msg)
        except (UnicodeError, ValueError, TypeError, RecursionError, OverflowError) as exc:
            # (OverflowError: an expiry past year 9999 in a record of an older release.)
            self._refused[i] = f"cannot encode the message: {exc!r}"
            return None
        return self._send(producer, msg, ready, mandatory=mandatory)

    def _put(
        self, producer: Producer, msg: TaskMessage, *, mandatory: bool = False, event: bool = True
    ) -> Outgoing | None:
        """Publish one task message (and its task-sent event) on ``producer``."""
        return self._send(producer, msg, self._prepare(msg), mandatory=mandatory, event=event)

    def _prepare(self, msg: TaskMessage) -> tuple[bytes | None, Outgoing | dict[str, Any]]:
        """The message encoded, once: (body bytes, Outgoing) with Celery's messages, or
        (body bytes, headers) without an app. Raises (UnicodeEncodeError: a lone
        surrogate, ...) if it cannot be encoded, before anything is published."""
        for name in (msg.queue, msg.exchange, msg.routing_key):
            name.encode()  # a destination the broker can be told (UnicodeEncodeError)
        if self._messages is None:
            body, args_json, kwargs_json = task_body(msg)
            return body, task_headers(msg, self.origin, args_json, kwargs_json)
        out = self._messages.build(msg)
        if msg.headers:
            json.dumps(msg.headers, ensure_ascii=False).encode()
        if out.payload is None:  # kombu serialises the body the signals saw: check it
            check_encodable(msg)
            return None, out
        return out.payload.encode(), out

    def _send(
        self,
        producer: Producer,
        msg: TaskMessage,
        ready: tuple[bytes | None, Outgoing | dict[str, Any]],
        *,
        mandatory: bool = False,
        event: bool = True,
    ) -> Outgoing | None:
        body, made = ready
        if not isinstance(made, Outgoing):
            producer.publish(
                body,
                routing_key=msg.routing_key or msg.queue,
                exchange=msg.exchange,
                content_type="application/json",
                content_encoding="utf-8",
                headers=made,
                priority=msg.priority or 0,  # 0: the transport's default
                delivery_mode=2,
                correlation_id=msg.task_id,
                reply_to="",
                mandatory=mandatory,
            )
            return None
        out = made
        if body is not None:  # already JSON: kombu sends the bytes as they are
            producer.publish(body, routing_key=msg.routing_key or msg.queue,
                             exchange=msg.exchange, headers=out.headers, delivery_mode=2,
                             mandatory=mandatory, content_type="application/json",
                             content_encoding="utf-8", priority=msg.priority or 0,
                             **out.properties)  # fmt: skip
        else:
            producer.publish(out.body, routing_key=msg.routing_key or msg.queue,
                             exchange=msg.exchange, serializer="json", headers=out.headers,
                             delivery_mode=2, mandatory=mandatory, priority=msg.priority or 0,
                             **out.properties)  # fmt: skip
        if event and self._messages is not None:
            self._messages.send_event(out, producer)
        return out

    def _published(self, sent: list[Outgoing | None]) -> None:
        if self._messages is not None:
            self._messages.published([out for out in sent if out is not None])

    def _declare(self, names: set[str]) -> None:
        """Declare each queue not yet declared on this connection, as the app's worker
        declares it (its exchange, binding and arguments: anything else fails with
        PRECONDITION_FAILED), so that no message is published before its queue exists."""
        new = sorted(names - self._declared)
        if not new:
            return
        assert self._conn is not None
        # On AMQP a refused declare closes its channel: never the publishing one.
        channel: Any = self._conn.channel() if self._confirms is not None else self._channel
        try:
            for name in new:
                try:
                    self._queue_for(name)(channel).declare()
                except tuple(self._conn.channel_errors) as exc:
                    # It exists with other arguments: routable all the same.
                    logger.warning("pump: queue %r exists as declared elsewhere, not as the "
                                   "app declares it: %s", name, exc)  # fmt: skip
                    if self._confirms is not None:
                        channel = self._conn.channel()
                self._declared.add(name)
                self._amqp_marker.queues.add(name)
        finally:
            if channel is not self._channel:
                with contextlib.suppress(Exception):
                    channel.close()

    def _queue_for(self, name: str) -> Queue:
        if self._app is not None:
            return self._app.amqp.queues[name]
        return Queue(name, Exchange(name), routing_key=name, durable=True)

    # ---------------------------------------------------------------- acks
    def drain_acks(self, timeout: float, limit: int = 1000) -> list[Ack]:
        channel = self._ensure()
        assert self._conn is not None
        try:
            self._conn.heartbeat_check()
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
        if self._confirms is not None:
            self._last_tag = message.delivery_tag  # acked with ``multiple`` when drained
        else:
            message.ack()

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
        if self._last_tag is not None and not self._buffer:
            # Only once the pump has them all: unacked ones come again after a reconnect.
            self._channel.basic_ack(self._last_tag, multiple=True)
            self._last_tag = None
        return out

    # ---------------------------------------------------------------- sessions
    def session(self) -> str:
        self._ensure()
        assert self._conn is not None
        if self._marker is None:
            return f"connection:{self._connects}"
        try:
            self._look()
        except self._errors(self._conn) as exc:
            raise self._fail(exc, "checking the session marker") from exc
        return f"{self.wal_id}:{self._epoch}"


def own_queue_arguments(app: Celery | None) -> dict[str, Any] | None:
    """Arguments of the publisher's own queues (acks, marker): quorum queues if the
    app's are (``task_default_queue_type`` or ``task_create_missing_queue_type``), so
    that in a cluster they fail over with them."""
    if app is None:
        return None
    types = (app.conf.task_default_queue_type, app.conf.task_create_missing_queue_type)
    return {"x-queue-type": "quorum"} if "quorum" in types else None
