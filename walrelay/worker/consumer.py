"""Worker-side defences against a consumer that dies or stops consuming after a broker
outage.

All three come with ``worker_consumer = "walrelay.worker.consumer:Consumer"`` (set in tasks.app):

1. **Bounded reconnect backoff.** Celery's consumer reconnects with kombu's defaults:
   2 s after the first failed attempt, 2 s more after each further one, up to 30 s. After a
   60 s outage a worker measured here sat idle for 12 s after Redis was back, and after a
   longer one it can be 30 s. ``Consumer`` retries after 0.5 s, then 1, 1.5 and 2 s at
   most, so a worker consumes again within about 2 s of the broker's return (a connect
   attempt every 2 s is nothing for a broker).
2. **A stuck-consumer watchdog** (the ``Watchdog`` bootstep), for the failure behind
   celery#8030, #8082 and #10205: the worker is connected, its event loop runs, but its
   consumer no longer fetches (its BRPOP socket no longer polled: kombu#2492, #2629). Every
   ``CHECK_INTERVAL`` seconds, from the worker's event loop, it looks at the worker's own
   state: no request reserved, running or scheduled, and no task started since the last
   look. Only then does it ask the broker, on its own short-timeout connection, whether
   the worker's queues hold messages. ``STRIKES`` such looks in a row mean the consumer is
   stuck: a healthy idle worker takes a queued message within about a second. The
   watchdog then raises a connection error inside the event loop, which sends the
   consumer down Celery's own connection-loss path (connection closed, consumer,
   channel and poller registrations rebuilt). If ``MAX_HEALS`` reconnections in a row
   get no task started, it shuts the worker down (exit code 1) for its supervisor
   (docker ``restart: unless-stopped``, systemd) to start a fresh process.

3. **No exit on a lost broker.** The consumer's Redis channels are
   ``walrelay.worker.redis_transport.Channel``, which turns the ``AttributeError`` Celery 5.7 hits
   when it closes a connection to a dead Redis while holding tasks into the connection
   error it expects (otherwise: "Unrecoverable error", worker exits 1).

The watchdog only ever acts on an idle worker facing queued work, so it never cancels a
task. It needs the event loop (prefork, the default pool); with other pools it stays off.
"""

from __future__ import annotations

import enum
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from celery import bootsteps
from celery.exceptions import WorkerShutdown
from celery.worker import state
from celery.worker.consumer import Consumer as CeleryConsumer
from celery.worker.consumer.tasks import Tasks

from . import redis_transport

logger = logging.getLogger(__name__)

# Reconnect pauses: 0.5, 1.0, 1.5, then 2.0 s between attempts for as long as it takes.
RECONNECT_FIRST = 0.5
RECONNECT_STEP = 0.5
RECONNECT_MAX = 2.0

CHECK_INTERVAL = 5.0  # seconds between looks: a stuck consumer is healed in 5-10 s
STRIKES = 2  # looks in a row that see an idle worker and queued work
MAX_HEALS = 3  # reconnections without a task started before the worker exits
# The queue-depth probe runs on the event loop: it must never hang it for long.
PROBE_TIMEOUT = 1.0


class ConsumerStalledError(ConnectionError):
    """Raised inside the worker's event loop to make Celery rebuild a stuck consumer
    (a ConnectionError is an OSError, which every transport counts as connection loss)."""


class Verdict(enum.Enum):
    OK = "ok"
    SUSPECT = "suspect"  # one strike: look again
    RECONNECT = "reconnect"
    EXIT = "exit"


@dataclass
class StuckDetector:
    """The watchdog's decision, free of Celery so that it can be tested alone."""

    strikes_needed: int = STRIKES
    max_heals: int = MAX_HEALS
    strikes: int = 0
    heals: int = 0  # reconnections since a task last started
    last_started: int | None = None

    def observe(self, idle: bool, started: int, queued: Callable[[], int | None]) -> Verdict:
        """One look. ``started``: tasks started so far (monotonic); ``queued``: messages
        waiting in the worker's queues, None if the broker cannot tell (then it is the
        broker that is down, which reconnection logic handles, not a stuck consumer)."""
        progressed = self.last_started is not None and started != self.last_started
        self.last_started = started
        if progressed:
            self.strikes = self.heals = 0
            return Verdict.OK
        if not idle:
            self.strikes = 0  # busy with a long task is not stuck
            return Verdict.OK
        waiting = queued()
        if not waiting:
            self.strikes = 0
            return Verdict.OK
        self.strikes += 1
        if self.strikes < self.strikes_needed:
            return Verdict.SUSPECT
        self.strikes = 0
        self.heals += 1
        return Verdict.EXIT if self.heals > self.max_heals else Verdict.RECONNECT


def worker_is_idle() -> bool:
    """No request reserved (prefetched), running, or waiting for an ETA."""
    scheduled = getattr(state, "scheduled_requests", ())  # not in celery-types' stubs
    return not (state.reserved_requests or state.active_requests or scheduled)


class QueueProbe:
    """Counts the messages waiting in some queues, on a connection of its own with short
    timeouts (never the consumer's, whose socket may be the broken one)."""

    def __init__(self, app: Any) -> None:
        self._app = app
        self._conn: Any = None
        self._channel: Any = None

    def waiting(self, queues: list[str]) -> int | None:
        try:
            if self._channel is None:
                options = {"socket_timeout": PROBE_TIMEOUT, "socket_connect_timeout": PROBE_TIMEOUT}
                self._conn = self._app.connection_for_read(transport_options=options)
                self._conn.ensure_connection(max_retries=0)  # one attempt, no sleeping
                self._channel = self._conn.channel()
            return sum(self._depth(name) for name in queues)
        except Exception as exc:  # any broker trouble: no verdict this time
            logger.debug("watchdog: cannot count queued messages: %r", exc)
            self.close()
            return None

    def _depth(self, name: str) -> int:
        try:
            return int(self._channel.queue_declare(queue=name, passive=True).message_count)
        except self._conn.channel_errors:
            return 0  # Redis: a queue with no message has no key, and "does not exist"

    def close(self) -> None:
        conn, self._conn, self._channel = self._conn, None, None
        if conn is not None:
            try:
                conn.release()
            except Exception as exc:  # already broken: nothing to save
                logger.debug("watchdog: closing the probe connection: %r", exc)


class Watchdog(bootsteps.StartStopStep):
    """Consumer bootstep: detect a connected consumer that does not consume; heal it."""

    requires = (Tasks,)
    label = "Watchdog"

    def __init__(self, c: Any, **kwargs: Any) -> None:
        self.detector = StuckDetector()
        self.probe: QueueProbe | None = None
        self.tref: Any = None
        super().__init__(c, **kwargs)

    def include_if(self, c: Any) -> bool:
        # Raising into the loop is how it heals: without the hub there is no loop to heal.
        return getattr(c, "hub", None) is not None

    def start(self, c: Any) -> None:
        self.probe = self.probe or QueueProbe(c.app)
        self.tref = c.timer.call_repeatedly(CHECK_INTERVAL, self.check, (c,))

    def stop(self, c: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None

    def shutdown(self, c: Any) -> None:
        self.stop(c)
        if self.probe is not None:
            self.probe.close()

    def check(self, c: Any) -> None:
        consumer = getattr(c, "task_consumer", None)
        if consumer is None or c.connection is None or self.probe is None:
            return
        queues = [q.name for q in consumer.queues]
        probe = self.probe
        verdict = self.detector.observe(
            worker_is_idle(), state.all_total_count[0], lambda: probe.waiting(queues)
        )
        if verdict is Verdict.RECONNECT:
            logger.warning(
                "watchdog: consumer stalled: idle for %.0fs while %s hold messages; "
                "reconnecting (heal %d of %d)",
                CHECK_INTERVAL * STRIKES, ",".join(queues), self.detector.heals, MAX_HEALS,
            )  # fmt: skip
            raise ConsumerStalledError("watchdog: consumer stalled, reconnecting")
        if verdict is Verdict.EXIT:
            logger.error(
                "watchdog: consumer still stalled after %d reconnections; shutting the "
                "worker down for its supervisor to restart it", MAX_HEALS,
            )  # fmt: skip
            raise WorkerShutdown(1)


_CeleryBlueprint: Any = CeleryConsumer.Blueprint  # the stubs declare it as a variable


class Consumer(CeleryConsumer):
    """Celery's consumer with a bounded reconnect backoff and the Watchdog bootstep."""

    class Blueprint(_CeleryBlueprint):  # type: ignore[misc]
        default_steps: ClassVar[list[str]] = [
            *_CeleryBlueprint.default_steps,
            "walrelay.worker.consumer:Watchdog",
        ]

    def ensure_connected(self, conn: Any) -> Any:
        # Celery calls conn.ensure_connection(errback, max_retries, callback=...) with
        # kombu's default intervals; shadowing the method on this one connection object
        # changes only the pauses and keeps all of Celery's retry logic.
        # Its channels also get the fix that keeps the worker alive when the broker dies
        # while it holds tasks (see walrelay.worker.redis_transport).
        redis_transport.use_fixed_channel(conn)
        conn.ensure_connection = functools.partial(
            conn.ensure_connection,
            interval_start=RECONNECT_FIRST,
            interval_step=RECONNECT_STEP,
            interval_max=RECONNECT_MAX,
        )
        return super().ensure_connected(conn)
