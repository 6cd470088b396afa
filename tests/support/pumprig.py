"""A pump on a real (temporary) log with the in-memory broker and a fake clock, for the
pump's unit tests (tests/walrelay/test_pump_*.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tasks.checkout import validate
from tasks.targets import TARGETS, TASK_NAMES
from walrelay.admission import Policy
from walrelay.broker import Ack, TaskMessage
from walrelay.brokers.stub import MemoryPublisher
from walrelay.deadletters import DeadLetterStore
from walrelay.pump import Pump, PumpConfig
from walrelay.record import Entry, TaskSpec, parse_task_id
from walstore import Wal, WalError

WALL_START = 1_700_000_000.0  # the fake wall clock (unix time) when the fake clock is 1000


def purchase_entry(purchase: dict[str, Any], created: float | None = None) -> Entry:
    """A purchase's record with named targets (relay.send numbers them "0", "1")."""
    return Entry(
        key=purchase["purchase_id"],
        tasks=tuple(TaskSpec(t, TASK_NAMES[t], t, [purchase]) for t in TARGETS),
        created=created,
    )


class Clock:
    """The pump's clock; ``wall`` is the matching unix time (etas and expiries)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return WALL_START + self.now - 1000.0

    def advance(self, seconds: float) -> None:
        self.now += seconds


def purchase(pid: str) -> dict[str, Any]:
    return validate({"purchase_id": pid, "customer": "Ada", "items": [{"sku": "s", "qty": 1}],
                     "total_cents": 1, "currency": "EUR"})  # fmt: skip


class Rig:
    """A pump on ``wal`` with a memory broker, a fake clock and its dead letters."""

    def __init__(self, wal: Wal, tmp: Path, policy: Policy | None = None, **config: Any) -> None:
        self.wal = wal
        self.clock = Clock()
        self.broker = MemoryPublisher(wal.wal_id)
        self.deadletters = DeadLetterStore(str(tmp / "wal"))
        self.policy = policy
        defaults: dict[str, Any] = {
            "checkpoint_interval": 0.0,
            "session_interval": 0.0,
            "ack_interval": 0.0,
        }
        self.config = PumpConfig(**{**defaults, **config})
        self.pump = self.new_pump()

    def new_pump(self) -> Pump:
        return Pump(self.wal, self.broker, self.deadletters, self.config, clock=self.clock,
                    sleep=self.clock.advance, wall=self.clock.wall, policy=self.policy)  # fmt: skip

    def append(self, n: int, prefix: str = "p") -> list[int]:
        """``n`` records as relay.send writes them (its send time from the real clock:
        the fake one starts at the same instant in every rig)."""
        return [
            self.wal.append(purchase_entry(purchase(f"{prefix}{i}"), time.time()).encode())
            for i in range(n)
        ]

    def append_entry(self, *tasks: TaskSpec, key: str | None = None, **fields: Any) -> int:
        return self.wal.append(Entry(key, tuple(tasks), **fields).encode())

    def steps(self, n: int = 3) -> None:
        for _ in range(n):
            self.pump.step()

    def run_for(self, seconds: float, every: float = 0.5) -> None:
        """Step with the clock moving ``every`` seconds at a time."""
        end = self.clock.now + seconds
        while self.clock.now < end:
            self.pump.step()
            self.clock.advance(every)

    def take(self, queue: str, limit: int = 1_000_000) -> list[TaskMessage]:
        return self.broker.take(queue, limit)

    def ack(
        self,
        messages: list[TaskMessage],
        ok: bool = True,
        error: str | None = None,
        echo: bool = True,
    ) -> None:
        """Ack as a worker does (``echo``: naming the copy it ran, as workers of this
        release do; older ones do not)."""
        for msg in messages:
            parsed = parse_task_id(msg.task_id)
            assert parsed is not None
            copy = msg.copy if echo else None
            self.broker.send_ack(Ack(*parsed, ok=ok, error=None if ok else error, copy=copy))

    def ack_everything(self) -> None:
        self.ack(self.take("warehouse") + self.take("finance"))

    def drain(self, rounds: int = 20) -> None:
        """Workers take and confirm everything queued, the pump applies it."""
        for _ in range(rounds):
            for queue in list(self.broker.queues):
                self.ack(self.take(queue))
            self.steps(2)


class FlakyReader:
    """A reader that, once, reads ahead (moving its position) and then fails: the records
    it parsed in that call are never returned."""

    def __init__(self, real: Any, fail: list[bool]) -> None:
        self.real, self.fail = real, fail

    @property
    def next_lsn(self) -> int:
        return int(self.real.next_lsn)

    def read(self, max_records: int = 4096, hwm: int | None = None) -> Any:
        records = self.real.read(max_records, hwm)
        if records and self.fail:
            self.fail.pop()
            raise WalError("EIO while reading the next chunk")
        return records

    def close(self) -> None:
        self.real.close()
