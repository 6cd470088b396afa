"""The pump's window: the entries published but not yet confirmed, with the per-target
state that decides when to re-send, when to count a failed attempt, and when to give up.

Celery-free and broker-free: it only produces TaskMessages and consumes Acks. What an
ack or a due timer means:

- a success confirms the task; a failure is a failed attempt, re-sent after a backoff
  (unless it was an older copy and a newer one is still queued);
- a task whose latest copy the workers have passed (they confirmed a later copy of its
  lane) and that is still unconfirmed one ack timeout later was lost: a failed
  attempt, re-sent;
- a lane with no ack at all for ``max_ack_timeout`` gets its oldest task re-sent, one
  per quiet period, not counted (a silent loss on an idle queue); a task whose lane
  has not moved for ``stall_timeout`` is dead (a queue, or a priority of it, no worker
  consumes); any ack moves its lane, also one of a task no longer in the window (a
  duplicate), by the lane tag of its copy name;
- past its expiry a task is confirmed by the pump itself (workers drop expired tasks
  without a word); after ``max_attempts`` failed attempts it is dead.
"""

from __future__ import annotations

import hashlib
import heapq
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from . import settings
from .admission import NO_OPTIONS, TaskOptions, message_for
from .broker import Ack, TaskMessage
from .lanes import LaneKey, Lanes
from .pumpstats import PumpStats
from .record import Entry, TaskSpec, decimal

NEVER = float("inf")
TIMERS_PER_STEP = 5000


@dataclass(frozen=True)
class PumpConfig:
    # Most entries unconfirmed at once: bounds memory, whatever the backlog.
    window: int = settings.DEFAULT_PUMP_WINDOW
    # Most records read from the log per step.
    read_batch: int = 1000
    # Seconds without an ack after which a task is suspected lost. It is re-sent (and
    # counted as a failed attempt) only once the workers have confirmed a copy published
    # after it on the same queue, and a further ack_timeout has passed: a slow queue is
    # not a lost message.
    ack_timeout: float = settings.DEFAULT_ACK_TIMEOUT
    # A queue with unconfirmed tasks and no ack for this long gets its oldest task re-sent
    # (one per queue per period, not counted): covers a silent loss on an idle queue.
    max_ack_timeout: float = settings.DEFAULT_MAX_ACK_TIMEOUT
    # Pause before re-sending a task that failed; doubles per failure, up to the max.
    retry_delay: float = settings.DEFAULT_RETRY_DELAY
    max_retry_delay: float = 60.0
    # Failed attempts (failures, proven losses, refused publishes) after which a target
    # goes to the dead letters.
    max_attempts: int = settings.DEFAULT_MAX_ATTEMPTS
    # A task whose queue has not moved (no ack at all) for this long while it waited goes
    # to the dead letters: a queue no worker consumes. Longer than any outage of the
    # workers you want to ride out (the broker's own outages do not count).
    stall_timeout: float = 7200.0
    # A record waiting for its eta longer than this is appended again (carried forward,
    # same task ids) so that it no longer pins old segments.
    carry_after: float = 3600.0
    # Most records held (waiting for their eta or their order key) at once; kept as
    # bytes. Reading pauses while this many are held.
    max_parked: int = 100_000
    # How often the low water mark is persisted (and segments pruned) at most.
    checkpoint_interval: float = 0.5
    # How often the broker session is checked (a Redis restart is a new run_id).
    session_interval: float = 0.5
    # Pause between looks at the log when there is nothing to read: what a new record
    # waits at most before it is published (the look is a read of shared memory).
    idle_wait: float = 0.002
    # Acks are fetched (one broker round trip for all that arrived) at least this often
    # while entries are in flight, and after every read.
    ack_interval: float = 0.01
    # Longest pause between reconnection attempts while the broker is down (and between
    # attempts to read past a log read error).
    max_reconnect_delay: float = 2.0
    # At most one progress line per this many seconds.
    log_interval: float = 1.0


@dataclass(slots=True)
class TargetState:
    """One task of one entry, until acked, expired or dead."""

    spec: TaskSpec
    lane: tuple[str, int]  # (queue, priority): where FIFO order holds
    options: TaskOptions = NO_OPTIONS  # the spec's options, checked
    attempts: int = 0  # failed attempts counted so far
    sends: int = 0
    published_at: float = 0.0
    first_published: float = 0.0  # first publication by this pump
    first_seq: int = 0  # publication counter of its first copy by this pump (0: none yet)
    pub_seq: int = 0  # ... of its latest copy
    passed_at: float = NEVER  # when a later copy on its lane was first seen confirmed
    seq: int = 0  # generation of its timer entry (stale heap items are skipped)
    retry_pending: bool = False  # failed or refused; waiting for its retry time
    hold_until: float = 0.0  # clock time before which it must not be published (eta)
    inherited: bool = False  # a previous pump may have published it (copies we cannot name)
    error: str | None = None

    @property
    def published(self) -> bool:
        return self.first_seq > 0


@dataclass(slots=True)
class InFlight:
    lsn: int  # where the record is in the log now
    identity: int  # the LSN its task ids are made of (Entry.identity)
    entry: Entry
    first_sent: float
    targets: dict[str, TargetState]
    dead: dict[str, TargetState] = field(default_factory=dict)
    record: str = field(init=False)  # fingerprint(entry): the record part of copy names

    def __post_init__(self) -> None:
        self.record = fingerprint(self.entry)


@dataclass
class Timers:
    """Due times of targets, in a heap; stale items are skipped and compacted away."""

    heap: list[tuple[float, int, int, str]] = field(default_factory=list)
    counter: int = 0
    compact_above: int = 4096  # next heap size at which stale items are swept

    def push(self, due: float, identity: int, target: TargetState) -> None:
        self.counter += 1
        target.seq = self.counter
        heapq.heappush(self.heap, (due, self.counter, identity, target.spec.target))

    def pop_due(self, now: float, limit: int) -> list[tuple[int, int, str]]:
        out: list[tuple[int, int, str]] = []
        heap = self.heap
        while heap and heap[0][0] <= now and len(out) < limit:
            _due, seq, identity, target = heapq.heappop(heap)
            out.append((seq, identity, target))
        return out

    def compact(self, live: dict[int, InFlight]) -> None:
        """Drop stale items (acks leave theirs behind). O(heap), so only when the heap
        has grown to twice what was live at the previous sweep: amortised O(1)."""
        if len(self.heap) <= self.compact_above:
            return
        keep = []
        for item in self.heap:
            flight = live.get(item[2])
            target = flight.targets.get(item[3]) if flight is not None else None
            if target is not None and target.seq == item[1]:
                keep.append(item)
        heapq.heapify(keep)
        self.heap = keep
        self.compact_above = max(4096, 2 * len(keep))


def retry_delay(config: PumpConfig, attempts: int) -> float:
    return float(min(config.retry_delay * 2 ** max(attempts - 1, 0), config.max_retry_delay))


Send = tuple[InFlight, TargetState]


class Window:
    """The entries in flight (by identity) and what acks and time make of them.
    ``finish`` is called with an entry whose every target is confirmed or dead."""

    def __init__(
        self,
        config: PumpConfig,
        stats: PumpStats,
        wal_id: str,
        wall: Callable[[], float],
        finish: Callable[[InFlight], None],
    ) -> None:
        self.config, self.stats, self.wal_id, self.wall = config, stats, wal_id, wall
        self._finish = finish
        self.run_id = os.urandom(4).hex()  # names this pump's copies (COPY_HEADER)
        self._lane_tags: dict[LaneKey, str] = {}  # the lane part of copy names, both ways
        self._tagged_lanes: dict[str, LaneKey | None] = {}
        self.flights: dict[int, InFlight] = {}  # by identity, in admission order
        self.lanes = Lanes()
        self.timers = Timers()
        self._pub_seq = 0

    def __len__(self) -> int:
        return len(self.flights)

    # ---------------------------------------------------------------- publishing
    def sent(self, flight: InFlight, target: TargetState, now: float) -> TaskMessage:
        """Record that ``target`` is being published now; returns its message."""
        self._pub_seq += 1
        target.sends += 1
        target.pub_seq = self._pub_seq
        if not target.first_seq:
            target.first_seq, target.first_published = self._pub_seq, now
        target.published_at = now
        target.passed_at = NEVER
        target.retry_pending = False
        self.lanes.sent(target.lane, (flight.identity, target.spec.target), now)
        self.timers.push(self._due(target, now, now + self.config.ack_timeout), flight.identity,
                         target)  # fmt: skip
        # "<run>.<publication>.<record>.<lane>": the record part tells this record from
        # another that had its LSN before a loss of the end of the log; the lane part
        # says which queue an ack of a task no longer in the window came from (see
        # apply_acks).
        copy = f"{self.run_id}.{self._pub_seq}.{flight.record}.{self._tag(target.lane)}"
        return message_for(self.wal_id, flight.identity, target.spec, copy, target.options)

    def _due(self, target: TargetState, now: float, due: float) -> float:
        """``due``, or the task's expiry if sooner."""
        expires = target.options.expires
        return due if expires is None else min(due, now + max(0.0, expires - self.wall()))

    def refused(self, flight: InFlight, target: TargetState, why: str, counted: bool,
                now: float) -> None:  # fmt: skip
        """The broker refused the task's message: retry later; if ``counted`` (others
        passed meanwhile) it is a failed attempt."""
        if counted:
            target.attempts += 1
            target.error = f"publish refused: {why}"
            if target.attempts >= self.config.max_attempts:
                self.kill(flight, target)
                return
        target.retry_pending = True
        delay = retry_delay(self.config, max(target.attempts, 1))
        self.timers.push(now + delay, flight.identity, target)

    def resendable(self) -> list[Send]:
        """Every published task not waiting for a retry (after a new broker session)."""
        return [
            (flight, target)
            for flight in self.flights.values()
            for target in flight.targets.values()
            if target.published and not target.retry_pending and not target.hold_until
        ]

    # ---------------------------------------------------------------- acks
    def apply_acks(self, acks: Iterable[Ack], now: float) -> None:
        for ack in acks:
            name = CopyName.parse(ack.copy)
            flight = self.flights.get(ack.lsn) if ack.wal_id == self.wal_id else None
            target = flight.targets.get(ack.target) if flight is not None else None
            if flight is None or target is None or not target.published:
                self.stats.duplicate_acks += 1
                self._moved(name, now)  # a duplicate: its queue moves all the same
                continue
            if name.record and name.record != flight.record:
                # A worker ran a copy of a record that had this LSN (and so these task
                # ids) before ``walstore repair`` accepted a lost end of the log: not
                # this record's task. Its queue is moving, though. (A name without the
                # record part, from an older worker or pump, cannot tell: it counts.)
                self.stats.stale_acks += 1
                self._moved(name, now)
                continue
            copy = self._copy_of(name, target)
            # Without a copy name the ack is some copy of the task, so at least its
            # first: the least progress it can mean (none if an earlier pump sent it).
            evidence = copy if copy is not None else (
                None if target.inherited or ack.copy else target.first_seq)  # fmt: skip
            self.lanes.confirmed(target.lane, evidence, now)
            if ack.ok:
                self.stats.acked += 1
                self.done(flight, target)
            else:
                self._failed(flight, target, ack, copy, now)

    def _tag(self, lane: LaneKey) -> str:
        tag = self._lane_tags.get(lane)
        if tag is None:
            tag = hashlib.blake2b(repr(lane).encode(), digest_size=8).hexdigest()
            self._lane_tags[lane] = tag
            # Two lanes with one tag (1 in 2**64 per pair): neither is credited by it.
            self._tagged_lanes[tag] = None if tag in self._tagged_lanes else lane
        return tag

    def _moved(self, name: CopyName, now: float) -> None:
        """A worker finished a task of the queue the copy name tags, with no evidence of
        any copy (a duplicate, a lost record's copy): the queue moves, and a backlog of
        such tasks is not a queue nobody consumes. A name without that part (an older
        pump's) says nothing."""
        lane = self._tagged_lanes.get(name.lane) if name.lane else None
        if lane is not None and lane in self.lanes.lanes:
            self.lanes.confirmed(lane, None, now)

    def _copy_of(self, name: CopyName, target: TargetState) -> int | None:
        """The copy number the ack names, if this pump published it for ``target``."""
        copy = name.number
        if name.run != self.run_id or copy is None:
            return None
        return copy if target.first_seq <= copy <= target.pub_seq else None

    def _failed(self, flight: InFlight, target: TargetState, ack: Ack, copy: int | None,
                now: float) -> None:  # fmt: skip
        if copy is None and target.retry_pending:
            self.stats.duplicate_acks += 1  # a second copy failing: already counted
            return
        self.stats.failed += 1
        target.attempts += 1
        target.error = ack.error
        if target.attempts >= self.config.max_attempts:
            self.kill(flight, target)
        elif not target.retry_pending and (copy is None or copy == target.pub_seq):
            # (An older copy failing while a newer one is queued: that one runs next.)
            target.retry_pending = True
            self.timers.push(now + retry_delay(self.config, target.attempts), flight.identity,
                             target)  # fmt: skip

    # ---------------------------------------------------------------- timers
    def due(self, now: float) -> tuple[list[Send], list[Send]]:
        """Tasks to publish now: (held until now, to send again)."""
        first: list[Send] = []
        again: list[Send] = []
        for seq, identity, name in self.timers.pop_due(now, TIMERS_PER_STEP):
            flight = self.flights.get(identity)
            target = flight.targets.get(name) if flight is not None else None
            if flight is None or target is None or target.seq != seq:
                continue  # acked, dead or rescheduled since
            if self._on_due(flight, target, now):
                (again if target.published else first).append((flight, target))
        self.timers.compact(self.flights)
        return first, again

    def _on_due(self, flight: InFlight, target: TargetState, now: float) -> bool:
        """Decide what a due timer means; True: publish ``target`` (again) now."""
        cfg = self.config
        expires = target.options.expires
        if expires is not None and self.wall() >= expires:
            self.stats.expired += 1
            self.done(flight, target)
            return False
        if target.hold_until:
            target.hold_until = 0.0
            return True
        if target.retry_pending:
            return True
        lane = self.lanes.get(target.lane, now)
        if lane.progress > target.pub_seq:  # the workers took later copies of its lane
            if target.passed_at == NEVER:
                target.passed_at = now  # one more ack timeout: it may still be running
            elif now - target.passed_at >= cfg.ack_timeout:
                return self._lost(flight, target)
            self.timers.push(target.passed_at + cfg.ack_timeout, flight.identity, target)
            return False
        stalled_since = max(lane.moved_at, target.first_published)
        if now - stalled_since >= cfg.stall_timeout:
            self.stats.stalled += 1
            target.error = (f"queue {target.spec.queue!r} did not move for "
                            f"{now - stalled_since:.0f}s: does any worker consume it?")  # fmt: skip
            self.kill(flight, target)
            return False
        quiet = now - max(lane.moved_at, lane.probed_at, target.published_at)
        slot = (flight.identity, target.spec.target)
        if quiet >= cfg.max_ack_timeout and self.lanes.head(target.lane) == slot:
            lane.probed_at = now  # one task per quiet period, to see if the lane moves
            self.stats.probes += 1
            return True
        due = min(now + cfg.ack_timeout, stalled_since + cfg.stall_timeout)
        self.timers.push(self._due(target, now, due), flight.identity, target)
        return False

    def _lost(self, flight: InFlight, target: TargetState) -> bool:
        self.stats.lost += 1
        target.attempts += 1
        target.error = (f"lost: no ack within {self.config.ack_timeout:g}s after later tasks "
                        "of its queue were confirmed")  # fmt: skip
        if target.attempts >= self.config.max_attempts:
            self.kill(flight, target)
            return False
        return True

    # ---------------------------------------------------------------- finishing
    def done(self, flight: InFlight, target: TargetState) -> None:
        del flight.targets[target.spec.target]
        target.seq = -1
        self.lanes.forget(target.lane, (flight.identity, target.spec.target))
        if not flight.targets:
            self._finish(flight)

    def kill(self, flight: InFlight, target: TargetState) -> None:
        flight.dead[target.spec.target] = target
        self.done(flight, target)


def fingerprint(entry: Entry) -> str:
    """Tells records apart that had the same LSN: its send time (``created``), hashed,
    which a record carried forward keeps; for a record without one (version 1, which is
    never carried forward) its content."""
    basis = entry.encode() if entry.created is None else repr(entry.created).encode()
    return hashlib.blake2b(basis, digest_size=6).hexdigest()


class CopyName(NamedTuple):
    """An ack's copy name (COPY_HEADER, as the worker echoed it), in its parts:
    "<run>.<publication>.<record>.<lane>"; "" (or None) for a part it lacks."""

    run: str
    number: int | None
    record: str
    lane: str

    @classmethod
    def parse(cls, copy: str | None) -> CopyName:
        parts = (copy or "").split(".")
        parts += [""] * (4 - len(parts))
        # An ack's copy name is the worker's word: anything may stand there.
        return cls(parts[0], decimal(parts[1], 18), parts[2], parts[3])
