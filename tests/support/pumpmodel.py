"""The world the pump's state-machine test (tests/walrelay/test_pump_model.py) runs the
real pump in: a model of the broker and its workers, and a log and a dead-letter store
that fail on demand. Each part records what really happened, for the invariants."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from tests.support.faultfs import SimulatedCrash
from tests.support.pumprig import FlakyReader
from walrelay.broker import Ack, TaskMessage
from walrelay.brokers.stub import MemoryPublisher
from walrelay.deadletters import DeadLetter, DeadLetterStore
from walrelay.errors import MessageRejectedError
from walrelay.record import decode, parse_task_id
from walstore import Wal


@dataclass
class TaskModel:
    """One task of one record, and what happened to it."""

    kind: str  # good, flaky1, flaky2, doomed, or a kind of poison
    queue: str
    fail_budget: int  # runs that will fail before one succeeds
    record: int  # the LSN (identity) of its record
    eta: float | None = None  # unix time: never published before
    expires: float | None = None  # unix time: done (by the pump) once past
    failures: int = 0
    drops: int = 0  # deliveries lost (taken, never acked)
    succeeded: bool = False
    copies: int = 0  # publications that reached a queue
    first_published: float | None = None  # clock time
    batch_failures: int = 0  # refused batches it was in (published again one by one)


class ModelBroker(MemoryPublisher):
    """The memory broker, telling ``landed`` of every copy that reaches a queue and
    counting the refused batches of each task; it can kill the pump in the middle of a
    publish (``crash_next``)."""

    def __init__(
        self, wal_id: str, tasks: dict[str, TaskModel], landed: Callable[[TaskMessage], None]
    ) -> None:
        super().__init__(wal_id)
        self.tasks, self.landed = tasks, landed
        self.crash_next = False

    def publish(self, messages: Sequence[TaskMessage]) -> None:
        if self.crash_next and not self.down:
            self.crash_next = False
            raise SimulatedCrash("the pump is killed in the middle of a publish")
        lengths = {q: len(d) for q, d in self.queues.items()}
        try:
            super().publish(messages)
        except MessageRejectedError:
            if len(messages) > 1:
                for msg in messages:
                    self.tasks[msg.task_id].batch_failures += 1
            raise
        finally:
            for q, d in self.queues.items():
                for msg in itertools.islice(d, lengths.get(q, 0), None):
                    self.landed(msg)


class Workers:
    """One worker per queue, at a rate (tasks/s), stopped or running; each delivery has
    a fate: ``ok``, ``drop`` (lost), ``dup`` (run twice), ``noecho`` (an older worker: the
    ack names no copy). A task fails while its fail budget lasts."""

    def __init__(self, broker: ModelBroker, queues: Sequence[str], rate: float) -> None:
        self.broker, self.queues = broker, tuple(queues)
        self.rates = dict.fromkeys(self.queues, rate)
        self.credit = dict.fromkeys(self.queues, 0.0)
        self.stopped: dict[str, float] = {}  # queue -> since when
        self.drops = 0

    def work(self, seconds: float, fates: Iterator[str]) -> None:
        if self.broker.down:
            return
        for queue in self.queues:
            if queue in self.stopped:
                continue
            self.credit[queue] += self.rates[queue] * seconds
            n = int(self.credit[queue])
            self.credit[queue] -= n
            for msg in self.broker.take(queue, n):
                self.run(msg, next(fates))

    def run(self, msg: TaskMessage, fate: str) -> None:
        t = self.broker.tasks[msg.task_id]
        if fate == "drop":
            t.drops += 1
            self.drops += 1
            return
        parsed = parse_task_id(msg.task_id)
        assert parsed is not None
        copy = None if fate == "noecho" else msg.copy
        for _ in range(2 if fate == "dup" else 1):
            if t.fail_budget > 0:
                t.fail_budget -= 1
                t.failures += 1
                self.broker.send_ack(Ack(*parsed, ok=False, error="Boom()", copy=copy))
            else:
                t.succeeded = True
                self.broker.send_ack(Ack(*parsed, ok=True, copy=copy))


class FaultyLog:
    """``wal`` with reads that fail on demand (``read_faults``: each entry fails one read
    after it parsed its records), and a record of what the pump appends itself
    (``carried``: LSN of a record carried forward -> its origin)."""

    def __init__(self, wal: Wal) -> None:
        self.read_faults: list[bool] = []
        self.carried: dict[int, int] = {}
        real_reader, real_append_batch = wal.reader, wal.append_batch

        def reader(lsn: int | None = None) -> Any:
            return FlakyReader(real_reader(lsn), self.read_faults)

        def append_batch(payloads: Sequence[bytes]) -> range:
            lsns = real_append_batch(payloads)
            for lsn, payload in zip(lsns, payloads, strict=True):
                origin = decode(payload).origin if payload.startswith(b'{"v":2') else None
                if origin is not None:
                    self.carried[lsn] = origin
            return lsns

        wal.reader = reader  # type: ignore[method-assign,assignment]
        wal.append_batch = append_batch  # type: ignore[method-assign]


class FaultyLetters(DeadLetterStore):
    """Dead letters that cannot be written while ``broken`` (a full disk)."""

    broken = False

    def add(self, letter: DeadLetter) -> None:
        if self.broken:
            raise OSError(28, "No space left on device")
        super().add(letter)
