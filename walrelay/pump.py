"""The pump: the only reader of the log. Publishes every unconfirmed entry's tasks, applies
the workers' acks, advances and persists the low water mark, re-sends what looks lost.

Celery-free: it talks to a ``Publisher`` (walrelay.broker), so the same logic runs
against the in-memory stub in unit tests and against kombu in production.

One step: check the broker session (a new one means queued tasks may be gone: re-send
everything in flight; the same one after an outage: re-send only what a failed
publish may not have delivered), read up to the free room of the window and publish,
release held records that are due, drain acks, handle due timers (retries, suspected
losses, stalled queues), persist the low water mark at most every
``checkpoint_interval``.

The low water mark is the lowest LSN the pump has not finished: every record below it
was read *and* confirmed or dead-lettered. It comes from what the pump admitted, never
from where its reader stands, so no read error, poison record or crash can make it pass
a record that was never published.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

from walstore import Wal, WalError

from . import publishing
from .admission import EXPIRED, HOLD, REFUSED, Decision, Policy, decide
from .broker import Publisher
from .deadletters import DeadLetter, DeadLetterStore
from .errors import BadRecordError, BrokerUnavailableError, KeyIndexError
from .keys import index_for
from .parking import Parked, Parking
from .pumpstats import PumpStats, log_progress
from .reading import LogCursor
from .record import Entry, decode
from .window import InFlight, PumpConfig, Send, TargetState, Window

logger = logging.getLogger("walrelay.pump")

PUBLISH_CHUNK = 1000
ACK_BATCH = 1000
CARRY_BATCH = 1000
STRAY_ACK_INTERVAL = 1.0  # with nothing in flight, still drain (duplicate) acks this often
RETRY_FINISH = 1.0  # seconds between attempts to write a dead letter that failed

__all__ = ["Pump", "PumpConfig", "PumpStats"]


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
        wall: Callable[[], float] = time.time,
        policy: Policy | None = None,
    ) -> None:
        self.wal = wal
        self.wal_id = wal.wal_id
        self.publisher = publisher
        self.deadletters = deadletters
        self.config = config or PumpConfig()
        self.clock, self.sleep, self.wall = clock, sleep, wall
        self.policy = policy
        self.stats = PumpStats()
        self.window = Window(self.config, self.stats, self.wal_id, wall, self._finish)
        self.inflight = self.window.flights  # by identity, in admission order
        self.timers = self.window.timers
        self.pending: dict[int, int] = {}  # LSN -> identity of every record not finished
        self.parking = Parking()
        self._persisted = wal.low_water_mark()
        self.cursor = LogCursor(wal, self._persisted, self.config, self.stats)
        # Records below this may have been published by an earlier pump: acks naming no
        # copy are no evidence of how far their queue got.
        self._startup_hwm = wal.high_water_mark()
        self._unfinished: list[InFlight] = []  # dead letters that could not be written yet
        self._session: str | None = None
        self._resend_all = False
        # Publication order (pub_seq) of the first message a failed publish may not have
        # delivered: it and everything published after it go again once the broker is
        # back, if it kept its queues (otherwise everything in flight does).
        self._unsure_from: int | None = None
        self._down_for = 0
        now = clock()
        self._next_session = self._next_checkpoint = self._next_ack = self._next_stray = now
        self._next_carry = self._next_finish = now
        self._next_log = now + self.config.log_interval
        self._last_log = (now, 0, 0)
        logger.info("pump: resuming at LSN %d (low water mark) of WAL %s, high water mark %d",
                    self._persisted, self.wal_id, self._startup_hwm)  # fmt: skip

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
            self._unpark(now)
            if self._acks_due(now, read):
                acks = self.publisher.drain_acks(0.0, ACK_BATCH)
                self.window.apply_acks(acks, self.clock())
            self._expire()
        except BrokerUnavailableError as exc:
            self._broker_lost(exc)
        self._carry(now)
        self._retry_unfinished(now)
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
            self.window.lanes.restart_clocks(now)  # an outage is no evidence against a queue
        self.stats.broker_down, self._down_for = False, 0
        return True

    def _broker_lost(self, exc: BrokerUnavailableError) -> None:
        if not self.stats.broker_down:
            logger.warning("pump: broker unavailable (%s); retrying", exc)
        # What was queued is re-sent only if the broker lost it: the next session says
        # (a publish cut short by the outage is re-sent in any case, see _publish).
        self.stats.broker_down = True

    # ---------------------------------------------------------------- reading, admission
    def _fill(self, now: float) -> int:
        room = self.config.window - len(self.inflight)
        if room <= 0 or len(self.parking) >= self.config.max_parked or self._resend_all:
            return 0
        sends: list[Send] = []
        limit = min(room, self.config.read_batch)
        admitted = self.cursor.admit(now, limit, lambda n, data: self._admit(n, data, now, sends))
        self._publish(sends)
        return admitted

    def _admit(self, lsn: int, payload: bytes, now: float, out: list[Send]) -> None:
        """Take the record at ``lsn`` into the pump's care (window, parking or dead
        letters). Raises only if it could do none of these (a dead letter not written):
        then nothing changed and the record is read again later."""
        identity, key = lsn, ""
        try:
            entry = decode(payload)
            if entry.origin is not None and not 0 <= entry.origin < lsn:
                raise BadRecordError(f"origin {entry.origin} is not an earlier LSN")
            identity, key = entry.identity(lsn), entry.key or ""
            plan = self._plan(entry)
        except Exception as exc:  # anything wrong with this record is this record's problem
            why = f"undecodable entry: {exc}" if isinstance(exc, BadRecordError) else (
                f"cannot replay entry: {type(exc).__name__}: {exc}")  # fmt: skip
            self._dead_letter(identity, key, payload, {}, why)
            return
        if identity in self.inflight:
            # A carried record whose original was still in the log when we crashed: the
            # original is in flight already; this copy is done.
            logger.info("pump: LSN %d repeats entry %d, already in flight", lsn, identity)
            return
        old = self.parking.remove(identity)
        if old is not None:
            self.pending.pop(old.lsn, None)  # the carried copy replaces its original
        self.pending[lsn] = identity
        k = entry.order_key
        if k and not self.parking.join(k, identity):
            self._park(lsn, identity, payload, entry, now, 0.0)
            return
        self._place(lsn, identity, entry, payload, plan, now, out)

    def _plan(self, entry: Entry) -> dict[str, Decision]:
        wall_now = self.wall()
        return {t.target: decide(t, self.policy, wall_now) for t in entry.tasks}

    def _offset(self) -> float:
        """Pump clock minus wall clock, read together: an eta (wall time) plus this is
        when it is due on the pump's clock. Not from the step's ``now``: the time spent
        since then would make a countdown due that much early."""
        return self.clock() - self.wall()

    def _place(self, lsn: int, identity: int, entry: Entry, payload: bytes,
               plan: dict[str, Decision], now: float, out: list[Send]) -> None:  # fmt: skip
        """Park a record whose every task waits for its eta; else into the window."""
        if all(d.kind == HOLD for d in plan.values()):
            due = max(now, min(d.eta for d in plan.values()) + self._offset())
            self._park(lsn, identity, payload, entry, now, due)
            return
        flight = InFlight(lsn, identity, entry, now, {})
        self.inflight[identity] = flight
        inherited = lsn < self._startup_hwm
        offset = self._offset()
        for spec in entry.tasks:
            d = plan[spec.target]
            target = TargetState(spec, (spec.queue, d.options.priority or 0), d.options,
                                 inherited=inherited)  # fmt: skip
            if d.kind == REFUSED:
                target.error = d.reason
                flight.dead[spec.target] = target
            elif d.kind == EXPIRED:
                self.stats.expired += 1
            elif d.kind == HOLD:
                target.hold_until = max(now, d.eta + offset)
                flight.targets[spec.target] = target
                self.timers.push(target.hold_until, identity, target)
            else:
                flight.targets[spec.target] = target
                out.append((flight, target))
        if not flight.targets:
            self._finish(flight)

    def _park(self, lsn: int, identity: int, payload: bytes, entry: Entry, now: float,
              due: float) -> None:  # fmt: skip
        # An ordered record is never carried forward: its new LSN would reorder its key.
        carriable = due > 0 and not entry.order_key
        self.parking.park(Parked(lsn, identity, payload, entry.order_key, due, now),
                          carriable=carriable)  # fmt: skip

    def _unpark(self, now: float) -> None:
        room = self.config.window - len(self.inflight)
        if room <= 0 or not len(self.parking):
            return
        sends: list[Send] = []
        for p in self.parking.ready(now, room):
            try:
                entry = decode(p.payload)
                plan = self._plan(entry)
            except Exception as exc:  # it decoded once already; still, never stop on it
                self.pending.pop(p.lsn, None)
                self._dead_letter(p.identity, "", p.payload, {}, f"cannot replay entry: {exc}")
                continue
            self._place(p.lsn, p.identity, entry, p.payload, plan, now, sends)
        self._publish(sends)

    def _carry(self, now: float) -> None:
        """Append records held longer than ``carry_after`` again (``origin`` keeps their
        identity), then let the low water mark pass their old LSNs."""
        if now < self._next_carry or not len(self.parking):
            return
        self._next_carry = now + 1.0
        held = list(self.parking.carriable(now, self.config.carry_after, CARRY_BATCH))
        if not held:
            return
        try:
            entries = [dataclasses.replace(decode(p.payload), origin=p.identity) for p in held]
            lsns = self.wal.append_batch([e.encode() for e in entries])
        except (WalError, OSError, BadRecordError) as exc:
            logger.error("pump: cannot carry %d held record(s) forward: %s", len(held), exc)
            self._next_carry = now + 10.0
            return
        moves: list[tuple[str, int, int]] = []
        for p, entry, new in zip(held, entries, lsns, strict=True):
            if entry.key and entry.created is not None:
                moves.append((entry.key, p.identity, new))
            self.parking.remove(p.identity)
            self.pending.pop(p.lsn, None)
            logger.debug("pump: entry %d carried forward from LSN %d to %d", p.identity, p.lsn,
                         new)  # fmt: skip
        self._note_carried(moves)
        self.stats.carried += len(held)

    def _note_carried(self, moves: list[tuple[str, int, int]]) -> None:
        """Tell the key index where keyed records (key, first LSN, new LSN) now live, so
        that losing the end of the log with their copies frees their keys (their
        originals are released next). Version-1 records were never indexed."""
        if not moves:
            return
        try:
            index_for(self.wal).note_carried(moves)
        except (sqlite3.Error, KeyIndexError, WalError, OSError) as exc:
            # Only a later loss of the log's end can matter: then these keys still answer
            # with their first receipt.
            logger.error("pump: cannot note %d carried key(s) in the key index: %s",
                         len(moves), exc)  # fmt: skip

    # ---------------------------------------------------------------- publishing
    def _publish(self, sends: list[Send], resend: bool = False) -> None:
        if not sends:
            return
        now = self.clock()
        # All marked sent first: if the broker fails halfway, the rest are re-sent with
        # everything else once a session is back.
        messages = [self.window.sent(flight, target, now) for flight, target in sends]
        for i in range(0, len(sends), PUBLISH_CHUNK):
            try:
                out = publishing.publish(self.publisher, messages[i : i + PUBLISH_CHUNK])
            except BrokerUnavailableError:
                # This chunk may be partly published, the rest not: re-sent once a session
                # is back (all in flight, if the broker lost its queues meanwhile).
                unsure = sends[i][1].pub_seq
                self._unsure_from = min(unsure, self._unsure_from or unsure)
                raise
            self.stats.published += out.accepted
            if resend:
                self.stats.redelivered += out.accepted
            for j, (why, proven) in out.refused.items():
                flight, target = sends[i + j]
                self.stats.rejected += 1
                logger.warning("pump: the broker refused task %s of entry %d: %s",
                               target.spec.target, flight.identity, why)  # fmt: skip
                self.window.refused(flight, target, why, proven, now)

    def _resend_everything(self) -> None:
        self._resend_all = False  # before publishing: a failure sets it again
        self.window.lanes.restart_clocks(self.clock())
        self._publish(self.window.resendable(), resend=True)
        self._unsure_from = None

    def _resend_unsure(self) -> None:
        """Re-send what a failed publish may not have delivered (the broker kept the rest)."""
        since = self._unsure_from or 0
        self._unsure_from = None
        sends = [(f, t) for f, t in self.window.resendable() if t.pub_seq >= since]
        self._publish(sends, resend=True)

    def _expire(self) -> None:
        first, again = self.window.due(self.clock())
        self._publish(first)
        self._publish(again, resend=True)

    # ---------------------------------------------------------------- finishing
    def _finish(self, flight: InFlight) -> None:
        if flight.dead:
            dead = flight.dead
            targets = {n: {"attempts": t.attempts, "error": t.error} for n, t in dead.items()}
            reason = "; ".join(f"{n}: {t.error}" for n, t in dead.items())
            try:
                payload = flight.entry.only(set(dead)).encode()
                self._dead_letter(flight.identity, flight.entry.key or "", payload, targets,
                                  reason)  # fmt: skip
            except OSError as exc:
                # Stays unfinished (the low water mark holds) until the letter is written.
                logger.error("pump: cannot write the dead letter of entry %d: %s",
                             flight.identity, exc)  # fmt: skip
                self._unfinished.append(flight)
                return
        self.inflight.pop(flight.identity, None)
        self.pending.pop(flight.lsn, None)
        self.stats.entries_done += 1
        if flight.entry.order_key:
            self.parking.leave(flight.entry.order_key, flight.identity)

    def _retry_unfinished(self, now: float) -> None:
        if not self._unfinished or now < self._next_finish:
            return
        self._next_finish = now + RETRY_FINISH
        again, self._unfinished = self._unfinished, []
        for flight in again:
            self._finish(flight)

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
        """The lowest LSN not finished: every LSN below was read and is confirmed or
        dead-lettered (or holds no record)."""
        for lsn in self.pending:
            return lsn
        return self.cursor.next_lsn

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
        st.parked = len(self.parking)
        st.low_water_mark = self.low_water_mark()
        st.high_water_mark = self.wal.high_water_mark()
        st.backlog = st.high_water_mark - st.low_water_mark
        st.read_lsn = self.cursor.next_lsn
        oldest = next(iter(self.inflight.values()), None)
        st.oldest_unconfirmed_age = 0.0 if oldest is None else self.clock() - oldest.first_sent
        return st

    def _maybe_log(self) -> None:
        now = self.clock()
        if now < self._next_log:
            return
        self._next_log = now + self.config.log_interval
        self._last_log = log_progress(logger, self.refresh_stats(), now, self._last_log)
