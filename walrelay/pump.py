"""The pump: the only reader of the log. Publishes every unconfirmed entry's tasks, applies
the workers' acks, advances and persists the low water mark, re-sends what looks lost.

Celery-free: it talks to a ``Publisher`` (walrelay.broker), so the same logic runs
against the in-memory stub in unit tests and against kombu in production.

One step: check the broker session (a new one means queued tasks may be gone: re-send
everything in flight; the same one after an outage: re-send only what a failed publish
may not have delivered), read up to the free room of the window and publish, drain acks,
handle due timers (retries after failures, suspected losses), persist the low water
mark at most every ``checkpoint_interval``, log at most once per ``log_interval``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from walstore import Wal, WalError

from .broker import Ack, Publisher, TaskMessage
from .deadletters import DeadLetter, DeadLetterStore
from .errors import BadRecordError, BrokerUnavailableError
from .record import decode
from .window import (
    InFlight,
    PumpConfig,
    TargetState,
    Timers,
    apply_ack,
    message_for,
    retry_delay,
)

logger = logging.getLogger("walrelay.pump")

PUBLISH_CHUNK = 1000
ACK_BATCH = 1000
TIMERS_PER_STEP = 5000
STRAY_ACK_INTERVAL = 1.0  # with nothing in flight, still drain (duplicate) acks this often

__all__ = ["Pump", "PumpConfig", "PumpStats"]


@dataclass
class PumpStats:
    """Counters of one pump's life (exported to Prometheus by walrelay.metrics)."""

    published: int = 0  # task messages published, first sends and re-sends
    redelivered: int = 0  # of which re-sends (timeouts, failures, broker restarts)
    acked: int = 0  # task-success acks applied
    failed: int = 0  # task-failure acks applied (each a failed attempt)
    lost: int = 0  # suspected losses counted as failed attempts
    duplicate_acks: int = 0  # acks for targets already done (duplicate deliveries)
    entries_done: int = 0  # entries that left the window (confirmed or dead)
    dead_lettered: int = 0  # entries written to the dead letters
    broker_sessions: int = 0  # broker sessions seen (restarts and reconnections + 1)
    broker_down: bool = False
    pruned_segments: int = 0
    in_flight: int = 0  # entries in the window
    backlog: int = 0  # high water mark minus low water mark
    oldest_unconfirmed_age: float = 0.0  # seconds since the oldest in-flight entry was sent
    low_water_mark: int = 0
    high_water_mark: int = 0
    read_lsn: int = 0  # next LSN the pump reads

    def as_dict(self) -> dict[str, float | int | bool]:
        return asdict(self)


class Pump:
    def __init__(
        self,
        wal: Wal,
        publisher: Publisher,
        deadletters: DeadLetterStore,
        config: PumpConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.wal = wal
        self.wal_id = wal.wal_id
        self.publisher = publisher
        self.deadletters = deadletters
        self.config = config or PumpConfig()
        self.clock, self.sleep = clock, sleep
        self.stats = PumpStats()
        self.inflight: dict[int, InFlight] = {}  # insertion (= LSN) order
        self.timers = Timers()
        self._pub_seq = 0
        self._progress: dict[str, int] = {}  # queue -> latest pub_seq the workers finished
        self._persisted = wal.low_water_mark()
        self.reader = wal.reader(self._persisted)
        self._session: str | None = None
        self._resend_all = False
        # Publication order (pub_seq) of the first message a failed publish may not have
        # delivered: it and everything published after it go again once the broker is
        # back, if it kept its queues (otherwise everything in flight does).
        self._unsure_from: int | None = None
        self._down_for = 0
        now = clock()
        self._next_session = self._next_checkpoint = self._next_ack = self._next_stray = now
        self._next_log = now + self.config.log_interval
        self._last_log = (now, 0, 0)
        logger.info("pump: resuming at LSN %d (low water mark) of WAL %s, high water mark %d",
                    self._persisted, self.wal_id, wal.high_water_mark())  # fmt: skip

    # ---------------------------------------------------------------- main loop
    def run(self, stop: threading.Event) -> None:
        """Step until ``stop`` is set, then persist the low water mark."""
        try:
            while not stop.is_set():
                self.step()
        finally:
            self.checkpoint(force=True)

    def step(self) -> None:
        now = self.clock()
        if (now >= self._next_session or self.stats.broker_down) and not self._check_session(now):
            self.checkpoint()
            self._down_for += 1
            self.sleep(min(0.05 * 2**self._down_for, self.config.max_reconnect_delay))
            return
        read = 0
        try:
            read = self._fill(now)
            if self._acks_due(now, read):
                self._apply_acks(self.publisher.drain_acks(0.0, ACK_BATCH))
            self._expire()
        except BrokerUnavailableError as exc:
            self._broker_lost(exc)
        self.checkpoint()
        self._maybe_log()
        if not read:
            self.sleep(self.config.idle_wait)

    def _acks_due(self, now: float, read: int) -> bool:
        """Fetch acks after a read, every ``ack_interval`` while entries are in flight,
        and once a second otherwise (stray duplicates): an idle pump costs no round trip."""
        if read or (self.inflight and now >= self._next_ack) or now >= self._next_stray:
            self._next_ack = now + self.config.ack_interval
            self._next_stray = now + STRAY_ACK_INTERVAL
            return True
        return False

    def _check_session(self, now: float) -> bool:
        self._next_session = now + self.config.session_interval
        try:
            session = self.publisher.session()
            if session != self._session:
                if self._session is not None:
                    logger.warning("pump: new broker session (%s): re-sending everything in "
                                   "flight", session)  # fmt: skip
                    self._resend_all = True
                self._session = session
                self.stats.broker_sessions += 1
            if self._resend_all:
                self._resend_everything()
            elif self._unsure_from is not None:
                self._resend_unsure()
        except BrokerUnavailableError as exc:
            self._broker_lost(exc)
            return False
        if self.stats.broker_down:
            logger.warning("pump: broker is back")
        self.stats.broker_down, self._down_for = False, 0
        return True

    def _broker_lost(self, exc: BrokerUnavailableError) -> None:
        if not self.stats.broker_down:
            logger.warning("pump: broker unavailable (%s); retrying", exc)
        # What was queued is re-sent only if the broker lost it: the next session says
        # (a publish cut short by the outage is re-sent in any case, see _publish).
        self.stats.broker_down = True

    # ---------------------------------------------------------------- reading
    def _fill(self, now: float) -> int:
        room = self.config.window - len(self.inflight)
        if room <= 0 or self._resend_all:
            return 0
        records = self.reader.read(min(room, self.config.read_batch))
        messages: list[TaskMessage] = []
        for lsn, payload in records:
            self._admit(lsn, payload, now, messages)
        self._publish(messages)
        return len(records)

    def _admit(self, lsn: int, payload: bytes, now: float, out: list[TaskMessage]) -> None:
        try:
            entry = decode(payload)
        except BadRecordError as exc:
            self._dead_letter(lsn, "", payload, {}, f"undecodable entry: {exc}")
            return
        targets = {spec.target: TargetState(spec) for spec in entry.tasks}
        flight = InFlight(lsn, entry, now, targets)
        self.inflight[lsn] = flight
        for target in targets.values():
            out.append(self._sent(flight, target, now))

    def _sent(self, flight: InFlight, target: TargetState, now: float) -> TaskMessage:
        """Record that ``target`` is being published now; returns its message."""
        self._pub_seq += 1
        target.sends += 1
        target.pub_seq = self._pub_seq
        target.published_at = now
        target.retry_pending = False
        self.timers.push(now + self.config.ack_timeout, flight.lsn, target)
        return message_for(self.wal_id, flight.lsn, target.spec)

    def _publish(self, messages: list[TaskMessage], resend: bool = False) -> None:
        """Publish messages just made by ``_sent`` (so the last has pub_seq ``_pub_seq``)."""
        first_seq = self._pub_seq - len(messages) + 1
        for i in range(0, len(messages), PUBLISH_CHUNK):
            chunk = messages[i : i + PUBLISH_CHUNK]
            try:
                self.publisher.publish(chunk)
            except BrokerUnavailableError:
                unsure = first_seq + i  # this chunk may be partly published, the rest not
                self._unsure_from = min(unsure, self._unsure_from or unsure)
                raise
            self.stats.published += len(chunk)
            if resend:
                self.stats.redelivered += len(chunk)

    def _resend_everything(self) -> None:
        now = self.clock()
        messages = [
            self._sent(flight, target, now)
            for flight in self.inflight.values()
            for target in flight.targets.values()
            if not target.retry_pending
        ]
        self._publish(messages, resend=True)
        self._resend_all = False
        self._unsure_from = None

    def _resend_unsure(self) -> None:
        """Re-send what a failed publish may not have delivered (the broker kept the rest)."""
        since, now = self._unsure_from or 0, self.clock()
        self._unsure_from = None
        messages = [
            self._sent(flight, target, now)
            for flight in self.inflight.values()
            for target in flight.targets.values()
            if not target.retry_pending and target.pub_seq >= since
        ]
        self._publish(messages, resend=True)

    # ---------------------------------------------------------------- acks and timers
    def _apply_acks(self, acks: Iterable[Ack]) -> None:
        now = self.clock()
        for ack in acks:
            flight = self.inflight.get(ack.lsn) if ack.wal_id == self.wal_id else None
            target = flight.targets.get(ack.target) if flight is not None else None
            result = apply_ack(flight, ack, self.config)
            if not result.applied or flight is None or target is None:
                self.stats.duplicate_acks += 1
                continue
            queue = target.spec.queue
            self._progress[queue] = max(self._progress.get(queue, 0), target.pub_seq)
            if ack.ok:
                self.stats.acked += 1
            else:
                self.stats.failed += 1
            if result.retry:
                target.retry_pending = True
                self.timers.push(now + retry_delay(self.config, target.attempts), ack.lsn, target)
            if result.finished:
                self._finish(flight)

    def _expire(self) -> None:
        now = self.clock()
        messages: list[TaskMessage] = []
        for seq, lsn, name in self.timers.pop_due(now, TIMERS_PER_STEP):
            flight = self.inflight.get(lsn)
            target = flight.targets.get(name) if flight is not None else None
            if flight is None or target is None or target.seq != seq:
                continue  # acked, dead or rescheduled since
            message = self._on_due(flight, target, now)
            if message is not None:
                messages.append(message)
        self.timers.compact(self.inflight)
        self._publish(messages, resend=True)

    def _on_due(self, flight: InFlight, target: TargetState, now: float) -> TaskMessage | None:
        cfg = self.config
        if target.retry_pending:
            return self._sent(flight, target, now)
        if self._progress.get(target.spec.queue, 0) > target.pub_seq:
            # Workers finished a later task of this queue: this one was lost (or kills
            # its worker). A failed attempt.
            self.stats.lost += 1
            target.attempts += 1
            target.error = f"no ack within {cfg.ack_timeout:g}s while later tasks completed"
            if target.attempts >= cfg.max_attempts:
                flight.dead[target.spec.target] = flight.targets.pop(target.spec.target)
                if not flight.targets:
                    self._finish(flight)
                return None
            return self._sent(flight, target, now)
        if now - target.published_at >= cfg.max_ack_timeout:
            return self._sent(flight, target, now)  # a silent loss on an idle queue
        due = min(now + cfg.ack_timeout, target.published_at + cfg.max_ack_timeout)
        self.timers.push(due, flight.lsn, target)
        return None

    def _finish(self, flight: InFlight) -> None:
        if flight.dead:
            dead = flight.dead
            targets = {n: {"attempts": t.attempts, "error": t.error} for n, t in dead.items()}
            payload = flight.entry.only(set(dead)).encode()
            self._dead_letter(flight.lsn, flight.entry.key or "", payload, targets,
                              f"{len(dead)} target(s) exhausted {self.config.max_attempts} "
                              "attempts")  # fmt: skip
        del self.inflight[flight.lsn]
        self.stats.entries_done += 1

    def _dead_letter(
        self, lsn: int, key: str, payload: bytes, targets: dict[str, dict[str, Any]], why: str
    ) -> None:
        # Durable before the entry leaves the window, hence before the LWM passes it.
        letter = DeadLetter(lsn, self.wal_id, key, payload, dict(targets), why, time.time())
        self.deadletters.add(letter)
        self.stats.dead_lettered += 1
        logger.error("pump: entry %d (%s) moved to the dead letters: %s", lsn, key or "?", why)

    # ---------------------------------------------------------------- watermark, stats
    def low_water_mark(self) -> int:
        """The lowest LSN not yet confirmed (every LSN below is done or dead-lettered)."""
        for lsn in self.inflight:
            return lsn
        return self.reader.next_lsn

    def checkpoint(self, force: bool = False) -> None:
        now = self.clock()
        if not force and now < self._next_checkpoint:
            return
        self._next_checkpoint = now + self.config.checkpoint_interval
        lwm = self.low_water_mark()
        if lwm > self._persisted:
            try:
                self.stats.pruned_segments += self.wal.set_low_water_mark(lwm)
            except WalError as exc:
                # The old mark stays valid (entries are redelivered, never lost): keep
                # pumping and try again at the next interval.
                logger.error("pump: %s", exc)
                return
            self._persisted = lwm

    def refresh_stats(self) -> PumpStats:
        st = self.stats
        st.in_flight = len(self.inflight)
        st.low_water_mark = self.low_water_mark()
        st.high_water_mark = self.wal.high_water_mark()
        st.backlog = st.high_water_mark - st.low_water_mark
        st.read_lsn = self.reader.next_lsn
        oldest = next(iter(self.inflight.values()), None)
        st.oldest_unconfirmed_age = 0.0 if oldest is None else self.clock() - oldest.first_sent
        return st

    def _maybe_log(self) -> None:
        now = self.clock()
        if now < self._next_log:
            return
        self._next_log = now + self.config.log_interval
        then, published, acked = self._last_log
        st = self.refresh_stats()
        if st.published == published and st.acked == acked and not st.backlog:
            return
        elapsed = max(now - then, 1e-9)
        self._last_log = (now, st.published, st.acked)
        logger.info(
            "pump: published %.0f/s acked %.0f/s redelivered %d dead %d in-flight %d "
            "backlog %d lwm %d hwm %d oldest %.1fs",
            (st.published - published) / elapsed, (st.acked - acked) / elapsed,
            st.redelivered, st.dead_lettered, st.in_flight, st.backlog, st.low_water_mark,
            st.high_water_mark, st.oldest_unconfirmed_age,
        )  # fmt: skip
