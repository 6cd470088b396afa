"""Session markers: how the publisher tells a broker that kept its queues from one that
lost them, whatever happened to the connection in between.

A reconnection alone says nothing: RabbitMQ keeps durable queues and persistent messages
over a restart, Redis with AOF or a Sentinel replica keep their keys, a Redis without
persistence comes back empty, and redis-py even reconnects to it transparently. So the
publisher leaves a marker in the broker beside its messages and looks at it:

- **Redis** (plain and Sentinel): a counter key per WAL, created at a random value and
  INCRed after every published batch. Redis writes (AOF) and replicates (Sentinel) in
  command order, so a counter that still holds the last value we saw means every LPUSH
  before it survived too; a missing key (a Redis restarted empty) or an older value (an
  AOF that lost its last second, a replica promoted before it caught up) means some may
  be gone. ``run_id`` cannot tell: it changes on an AOF restart that kept everything.
- **AMQP** (RabbitMQ): a durable queue per WAL holding one persistent message, declared
  like the task queues. Every publish is confirmed, so a confirmed message is stored as
  durably as the marker; the queue empty (or just created) means the broker lost it.

``check`` returns True while the broker kept the marker, False when it was lost (the
marker is then laid again: the next check compares with the new one).
"""

from __future__ import annotations

import secrets
from typing import Any

MARKER_PREFIX = "walstore.marker."


def marker_name(wal_id: str) -> str:
    return MARKER_PREFIX + wal_id


class RedisMarker:
    """The counter key, read and written with a redis-py client (kombu's channel client:
    same URL, password, TLS, Sentinel pool), given again after each reconnection."""

    def __init__(self, wal_id: str) -> None:
        self.key = marker_name(wal_id)
        self.client: Any = None
        self.expected: int | None = None  # the value we last saw; None before the first look
        self.in_flight = False  # an INCR was sent; its answer may have been lost

    def bind(self, client: Any) -> None:
        self.client = client

    def check(self) -> bool:
        """True if the broker kept the marker (or this is the first look)."""
        raw = self.client.get(self.key)
        value = None if raw is None else int(raw)
        expected = self.expected
        kept = expected is None or value == expected
        kept = kept or (self.in_flight and value == (expected or 0) + 1)
        self.in_flight = False
        if value is None:
            # From a random start: a Redis restarted empty never counts up to it again.
            self.client.set(self.key, secrets.randbits(48), nx=True)
            value = int(self.client.get(self.key))
        self.expected = value
        return kept

    def advance(self) -> bool:
        """After a published batch; False if the counter was not where we left it (the
        broker lost writes since the last look)."""
        self.in_flight = True
        value = int(self.client.incr(self.key))
        self.in_flight = False
        kept = self.expected is not None and value == self.expected + 1
        self.expected = value
        return kept


class AmqpMarker:
    """The marker queue, on a py-amqp channel in confirm mode (see ``Confirms``), given
    again after each reconnection, with the task queues published to so far: a queue
    declared moments before a crash can be gone after it while older ones survive (seen
    with RabbitMQ 3.10), so each must still exist for the broker to count as kept."""

    def __init__(self, wal_id: str, arguments: dict[str, Any] | None = None) -> None:
        self.queue = marker_name(wal_id)
        self.arguments = arguments or None
        self.channel: Any = None
        self.confirm: Any = None  # () -> None: waits until the broker confirmed it
        self.open_channel: Any = None  # () -> channel, for passive declares (404 closes it)
        self.queues: set[str] = set()  # task queues published to: each must survive too
        self.laid = False

    def bind(self, channel: Any, confirm: Any, open_channel: Any) -> None:
        self.channel, self.confirm, self.open_channel = channel, confirm, open_channel

    def check(self) -> bool:
        """True if the broker kept the marker and every task queue (or this is the first
        look)."""
        declared = self.channel.queue_declare(
            self.queue, durable=True, auto_delete=False, arguments=self.arguments
        )
        kept = declared.message_count > 0 and self._queues_exist()
        if declared.message_count == 0:
            body = b"walrelay session marker: do not consume"
            message = self.channel.prepare_message(body, properties={"delivery_mode": 2})
            self.channel.basic_publish(message, exchange="", routing_key=self.queue,
                                       mandatory=True)  # fmt: skip
            self.confirm()
        if not kept:
            self.queues.clear()  # what was lost is declared again before its next publish
        first, self.laid = not self.laid, True
        return kept or first

    def _queues_exist(self) -> bool:
        if not self.queues:
            return True
        channel = self.open_channel()
        try:
            for name in sorted(self.queues):
                channel.queue_declare(name, passive=True)
            return True
        except Exception as exc:
            if getattr(exc, "reply_code", None) == 404:  # NOT_FOUND: the broker lost it
                return False
            raise
        finally:
            if channel.is_open:
                channel.close()

    def advance(self) -> bool:
        return True  # confirmed messages are stored as durably as the marker
