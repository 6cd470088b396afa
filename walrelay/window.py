"""The pump's window: the entries published but not yet confirmed, with the per-target
state that decides when to re-send, when to count a failed attempt, and when to give up.

Celery-free and broker-free: it only produces TaskMessages and consumes Acks.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from . import settings
from .broker import Ack, TaskMessage
from .record import Entry, TaskSpec, task_id


@dataclass(frozen=True)
class PumpConfig:
    # Most entries unconfirmed at once: bounds memory, whatever the backlog.
    window: int = settings.DEFAULT_PUMP_WINDOW
    # Most records read from the log per step.
    read_batch: int = 1000
    # Seconds without an ack after which a task is suspected lost. It is re-sent (and
    # counted as a failed attempt) only if the workers have since finished a task
    # published after it on the same queue: a slow queue is not a lost message.
    ack_timeout: float = settings.DEFAULT_ACK_TIMEOUT
    # A task unconfirmed this long is re-sent even without that evidence (not counted).
    max_ack_timeout: float = settings.DEFAULT_MAX_ACK_TIMEOUT
    # Pause before re-sending a task that failed; doubles per failure, up to the max.
    retry_delay: float = settings.DEFAULT_RETRY_DELAY
    max_retry_delay: float = 60.0
    # Failed attempts after which a target goes to the dead letters.
    max_attempts: int = settings.DEFAULT_MAX_ATTEMPTS
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
    # Longest pause between reconnection attempts while the broker is down.
    max_reconnect_delay: float = 2.0
    # At most one progress line per this many seconds.
    log_interval: float = 1.0


@dataclass(slots=True)
class TargetState:
    """One task of one entry, until acked or dead."""

    spec: TaskSpec
    attempts: int = 0  # failed attempts counted so far
    sends: int = 0
    published_at: float = 0.0
    pub_seq: int = 0  # publication order: compared with what the workers have finished
    seq: int = 0  # generation of its timer entry (stale heap items are skipped)
    retry_pending: bool = False  # failed; waiting for its retry time
    error: str | None = None


@dataclass(slots=True)
class InFlight:
    lsn: int
    entry: Entry
    first_sent: float
    targets: dict[str, TargetState]
    dead: dict[str, TargetState] = field(default_factory=dict)


@dataclass
class Timers:
    """Due times of targets, in a heap; stale items are skipped and compacted away."""

    heap: list[tuple[float, int, int, str]] = field(default_factory=list)
    counter: int = 0
    compact_above: int = 4096  # next heap size at which stale items are swept

    def push(self, due: float, lsn: int, target: TargetState) -> None:
        self.counter += 1
        target.seq = self.counter
        heapq.heappush(self.heap, (due, self.counter, lsn, target.spec.target))

    def pop_due(self, now: float, limit: int) -> list[tuple[int, int, str]]:
        out: list[tuple[int, int, str]] = []
        heap = self.heap
        while heap and heap[0][0] <= now and len(out) < limit:
            _due, seq, lsn, target = heapq.heappop(heap)
            out.append((seq, lsn, target))
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


def message_for(wal_id: str, lsn: int, spec: TaskSpec) -> TaskMessage:
    return TaskMessage(task_id(wal_id, lsn, spec.target), spec.name, spec.queue, spec.args,
                       spec.kwargs)  # fmt: skip


class AckResult:
    """What applying one ack did (``applied``: it changed the window)."""

    __slots__ = ("applied", "finished", "retry")

    def __init__(self, applied: bool, finished: bool = False, retry: bool = False) -> None:
        self.applied = applied
        self.finished = finished
        self.retry = retry


def apply_ack(flight: InFlight | None, ack: Ack, config: PumpConfig) -> AckResult:
    """Mark one target of ``flight`` done or failed (the caller schedules retries)."""
    target = flight.targets.get(ack.target) if flight is not None else None
    if flight is None or target is None:
        return AckResult(False)
    if ack.ok:
        del flight.targets[ack.target]
        target.seq = -1
        return AckResult(True, finished=not flight.targets)
    if target.retry_pending:
        return AckResult(False)  # a second copy failing: already counted
    target.attempts += 1
    target.error = ack.error
    if target.attempts >= config.max_attempts:
        flight.dead[ack.target] = flight.targets.pop(ack.target)
        target.seq = -1
        return AckResult(True, finished=not flight.targets)
    return AckResult(True, retry=True)


def retry_delay(config: PumpConfig, attempts: int) -> float:
    return float(min(config.retry_delay * 2 ** max(attempts - 1, 0), config.max_retry_delay))
