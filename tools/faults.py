"""The faults of the chaos command: a seeded schedule, and how each fault is injected into
a ``LocalStack``.

``plan(seed, duration, ...)`` is a pure function: the same arguments give the same
schedule (kinds, times, durations, targets). Kinds are drawn from a shuffled bag of all
of them, so every kind comes up before any comes up twice.

Broker faults are in the broker's own terms (``tools.brokers``): a Redis kill -9 loses
everything queued, a RabbitMQ node keeps its durable queues, a Sentinel primary killed
fails over to the replica.

| kind | what is done |
|---|---|
| broker-restart | kill -9 the broker (Sentinel: its primary), bring it back at once |
| broker-down | kill -9 the broker, leave it down for ``hold`` s, bring it back |
| broker-stall | SIGSTOP the broker for ``hold`` s (connections open, no answers), SIGCONT |
| acks-lost | SIGSTOP the workers for ``hold`` s (tasks queue up), SIGSTOP the pump and
  SIGCONT the workers: they run the queued tasks and push acks the pump does not read;
  the broker loses everything (tasks done, acks gone), SIGCONT the pump |
| pump-kill | kill -9 the pump, restart it after ``hold`` s |
| pool-child-kill | SIGKILL a pool process of worker ``target`` caught running (a task) |
| worker-kill | SIGKILL worker ``target``'s main process (and then its pool, as a service
  manager would), restart it after ``hold`` s |
| producer-kill | SIGKILL producer ``target`` caught running (mid-append), start a new one |
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from tools.localstack import LocalStack
from tools.processes import kill_busy, send_signal
from walrelay.broker import ack_queue

KINDS = (
    "broker-restart",
    "broker-down",
    "broker-stall",
    "acks-lost",
    "pump-kill",
    "pool-child-kill",
    "worker-kill",
    "producer-kill",
)
QUEUES = ("warehouse", "finance")
BROKER_KINDS = frozenset({"broker-restart", "broker-down", "broker-stall", "acks-lost"})
# (low, high) of the uniform draw of ``hold`` per kind, in seconds.
HOLD = {
    "broker-restart": (0.0, 0.0),
    "broker-down": (2.0, 8.0),
    "broker-stall": (1.0, 5.0),
    "acks-lost": (0.5, 2.0),
    "pump-kill": (0.0, 3.0),
    "pool-child-kill": (0.0, 0.0),
    "worker-kill": (0.0, 3.0),
    "producer-kill": (0.0, 0.0),
}


@dataclass(frozen=True)
class Fault:
    at: float  # seconds after the run started (not before; later if the previous overran)
    kind: str
    hold: float  # seconds the fault lasts (see the table above)
    target: int  # index of the worker or producer it hits (0 when irrelevant)

    def describe(self) -> str:
        hold = f" for {self.hold:.1f}s" if self.hold else ""
        who = ""
        if self.kind in ("pool-child-kill", "worker-kill"):
            who = f" worker{self.target + 1}"
        elif self.kind == "producer-kill":
            who = f" producer{self.target + 1}"
        return f"{self.kind}{who}{hold}"


def plan(
    seed: int, duration: float, *, workers: int, producers: int, mean_gap: float = 8.0
) -> list[Fault]:
    """The fault schedule for ``seed``: faults from a short warm-up until shortly before
    ``duration`` ends, ``mean_gap`` s apart on average (uniform from half to 1.5 times)."""
    rng = random.Random(seed)
    margin = min(5.0, duration * 0.15)
    at, end = margin, duration - margin
    bag: list[str] = []
    faults: list[Fault] = []
    while True:
        if not bag:
            bag = list(KINDS)
            rng.shuffle(bag)
        kind = bag.pop()
        hold = round(rng.uniform(*HOLD[kind]), 1)
        count = producers if kind == "producer-kill" else workers
        target = rng.randrange(max(count, 1))
        if at + hold > end:
            return faults
        faults.append(Fault(round(at, 1), kind, hold, target))
        at += hold + rng.uniform(0.5, 1.5) * mean_gap


class Producers(Protocol):
    def replace_busy(self, index: int) -> str:
        """SIGKILL producer ``index`` caught running, start its successor; says what
        was killed."""


@dataclass
class Injected:
    """What happened when a fault was injected (times relative to the run's start)."""

    fault: Fault
    started: float
    ended: float = 0.0
    back_at: float | None = None  # broker answering again / process restarted
    back_hwm: int | None = None  # the log's high water mark at that moment
    recovery: float | None = None  # filled in later from the monitor's samples
    note: str = ""
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        doc = {k: v for k, v in asdict(self).items() if k != "fault"}
        return {**asdict(self.fault), **doc}


@dataclass
class Injector:
    """Injects faults into ``stack`` and its ``producers``."""

    stack: LocalStack
    producers: Producers
    t0: float = field(default_factory=time.monotonic)

    def inject(self, fault: Fault) -> Injected:
        done = Injected(fault, time.monotonic() - self.t0)
        name = "_" + fault.kind.replace("-", "_")
        action: Callable[[Fault, Injected], None] = getattr(self, name)
        try:
            action(fault, done)
        except Exception as exc:  # a fault that could not be injected is reported, not fatal
            done.error = f"{type(exc).__name__}: {exc}"
        done.ended = time.monotonic() - self.t0
        return done

    def _back(self, done: Injected) -> None:
        done.back_at = time.monotonic() - self.t0
        done.back_hwm = self.stack.wal().high_water_mark

    # ------------------------------------------------------------------ broker
    def _broker_restart(self, fault: Fault, done: Injected) -> None:
        self.stack.broker.crash()
        self.stack.broker.recover()
        self._back(done)

    def _broker_down(self, fault: Fault, done: Injected) -> None:
        self.stack.broker.crash()
        time.sleep(fault.hold)
        self.stack.broker.recover()
        self._back(done)

    def _broker_stall(self, fault: Fault, done: Injected) -> None:
        self.stack.broker.pause()
        try:
            time.sleep(fault.hold)
        finally:
            self.stack.broker.resume()
        self._back(done)

    def _acks_lost(self, fault: Fault, done: Injected) -> None:
        """Workers paused for ``hold`` s (tasks queue up), then the pump paused and the
        workers let go: they run the queued tasks and push acks nobody reads; then the
        broker dies with them."""
        pump = self.stack.pump
        if pump is None or not pump.alive:
            raise RuntimeError("no pump running")
        queue = ack_queue(self.stack.wal().wal_id)
        broker = self.stack.broker
        workers = [w.pid for w in self.stack.workers if w is not None and w.alive]
        try:
            for pid in workers:  # main processes: they stop fetching; the pools idle
                send_signal(pid, signal.SIGSTOP)
            time.sleep(fault.hold)
            send_signal(pump.pid, signal.SIGSTOP)
        finally:
            for pid in workers:
                send_signal(pid, signal.SIGCONT)
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and sum(map(broker.depth, QUEUES)) > 0:
                time.sleep(0.05)
            time.sleep(0.2)  # the last acks of the last tasks
            done.note = f"{broker.depth(queue)} acks unread by the paused pump"
            broker.lose_everything()
            self._back(done)
        finally:
            send_signal(pump.pid, signal.SIGCONT)

    # ------------------------------------------------------------------ processes
    def _pump_kill(self, fault: Fault, done: Injected) -> None:
        old = self.stack.pump
        self.stack.kill_pump()
        time.sleep(fault.hold)
        new = self.stack.start_pump()
        self._back(done)
        done.note = f"pid {old.pid if old else '?'} killed, pid {new.pid} resumed"

    def _worker_kill(self, fault: Fault, done: Injected) -> None:
        index = fault.target % len(self.stack.workers)
        old = self.stack.workers[index]
        pool = self.stack.pool_children(index)
        self.stack.kill_worker(index)
        time.sleep(fault.hold)
        new = self.stack.start_worker(index)
        self._back(done)
        done.note = (f"pid {old.pid if old else '?'} and its pool {pool} killed, "
                     f"pid {new.pid} ready")  # fmt: skip

    def _pool_child_kill(self, fault: Fault, done: Injected) -> None:
        index = fault.target % len(self.stack.workers)
        done.note = kill_busy(self.stack.pool_children(index))

    def _producer_kill(self, fault: Fault, done: Injected) -> None:
        done.note = self.producers.replace_busy(fault.target)
