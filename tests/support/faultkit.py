"""Machinery of the crash-the-broker fault suite (tests/test_faults*.py).

``Pipeline``: a ``Stack`` (tests/support/stack.py) on a private broker (``tools.brokers``:
Redis, RabbitMQ or a Redis Sentinel set, each faulted in its own terms) with two real
workers (``celery -A fault_app worker``: the product's app plus test hooks, see
tests/fault_app.py), the real pump and a ``WalMonitor`` sampling the log's watermarks.
``Producers``: real processes calling ``record_purchase`` in a loop
(tests/fault_producer.py), each with its journal. ``Pipeline.check`` is the end of every
case: the backlog drains, every acknowledged purchase has exactly one effect at both
targets, no effect belongs to an unknown purchase, nothing is dead-lettered, and
``walstore status --json`` shows pending 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tests.support.stack import ROOT, Stack, wait_until
from tools.audit import Audit, WalMonitor, audit
from tools.brokers import Broker, make_broker
from tools.processes import Proc, send_signal
from tools.roles import wait_worker
from walrelay.broker import ack_queue
from walrelay.deadletters import DeadLetterStore
from walstore.inspect import Snapshot, snapshot

TESTS = Path(__file__).resolve().parent
WALSTORE = str(Path(sys.executable).with_name("walstore"))
TARGETS = ("warehouse", "finance")
# The pump re-sends a task suspected lost after this long (worker kills rely on it). The
# broker cases must recover well before it: their recovery comes from the new session.
ACK_TIMEOUT = 15.0
RECOVERY_BOUND = 8.0  # seconds from "the broker is back" to the low water mark moving
# ... per broker. A RabbitMQ node's clients reconnect once it recovered its queues. A
# Sentinel primary frozen (not dead) takes with it what was sent to it in the seconds
# before the failover, acks included: the pump re-sends those tasks after ACK_TIMEOUT
# (measured: drain started 23.8 s after the failover, on a loaded machine).
RECOVERY_BOUNDS = {"redis": RECOVERY_BOUND, "rabbitmq": 15.0, "sentinel": ACK_TIMEOUT + 15}
DRAIN_TIMEOUT = 180.0


def suite_env(marks: Path) -> dict[str, str]:
    return {
        # fault_app (``celery -A fault_app``); the checkout, for ``python
        # tests/support/fault_producer.py`` (a script's path puts only its own folder first).
        "PYTHONPATH": os.pathsep.join((str(TESTS), str(ROOT))),
        "FAULT_MARKS": str(marks),
        "WAL_SYNC": "always",  # as deployed: acknowledged means fsync'd
        "PUMP_ACK_TIMEOUT": str(ACK_TIMEOUT),
        "PUMP_MAX_ACK_TIMEOUT": str(2 * ACK_TIMEOUT),
    }


F = TypeVar("F", bound=Callable[..., Any])


def slow_on(*kinds: str) -> Callable[[F], F]:
    """Mark a case ``slow`` on these brokers only (tests/system/conftest.py applies it):
    essential cases run on every broker by default, long ones on Redis only."""

    def mark(func: F) -> F:
        func.slow_on = kinds  # type: ignore[attr-defined]
        return func

    return mark


def kill_pids(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        send_signal(pid, sig)


@dataclass
class Journal:
    attempted: set[str] = field(default_factory=set)
    acked: dict[str, tuple[float, float]] = field(default_factory=dict)  # id: (at, latency)
    errors: list[str] = field(default_factory=list)

    def add(self, path: Path) -> None:
        text = path.read_text(errors="replace")
        for line in text[: text.rfind("\n") + 1].splitlines():  # whole lines only
            kind, _, rest = line.partition(" ")
            fields = rest.split(" ")
            if kind == "try":
                self.attempted.add(fields[0])
            elif kind == "ok":
                self.acked[fields[0]] = (float(fields[2]), float(fields[3]))
            elif kind == "err":
                self.errors.append(rest)

    def window(self, start: float, end: float) -> list[float]:
        """Latencies of the appends acknowledged between ``start`` and ``end``."""
        return [lat for at, lat in self.acked.values() if start <= at <= end]


def latency_summary(latencies: list[float]) -> str:
    if not latencies:
        return "no appends"
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (f"{len(ordered)} appends, p50 {statistics.median(ordered) * 1e3:.1f} ms, "
            f"p99 {p99 * 1e3:.1f} ms, max {ordered[-1] * 1e3:.1f} ms")  # fmt: skip


@dataclass
class Producers:
    """``count`` producer processes, ids ``<prefix>p<i>-<n>``, ``rate`` purchases/s each."""

    stack: Stack[Broker]
    prefix: str
    count: int
    rate: float
    max_seconds: float = 200.0
    max_count: int = 1_000_000
    procs: list[Proc] = field(default_factory=list)

    def path(self, i: int) -> Path:
        return self.stack.tmp / "journals" / f"{self.prefix}p{i}.log"

    def start(self) -> Producers:
        self.path(0).parent.mkdir(exist_ok=True)
        for i in range(self.count):
            argv = [sys.executable, "-m", "tests.support.fault_producer", str(self.path(i)),
                    f"{self.prefix}p{i}", str(self.rate), str(self.max_seconds),
                    str(self.max_count)]  # fmt: skip
            self.procs.append(self.stack.spawn(f"{self.prefix}p{i}", argv))
        return self

    def stop(self) -> list[int]:
        """SIGTERM (they finish the append in progress) and their exit codes."""
        return [p.stop(signal.SIGTERM, timeout=30) for p in self.procs]

    def wait(self, timeout: float) -> list[int]:
        return [p.wait(timeout) for p in self.procs]

    def journal(self) -> Journal:
        journal = Journal()
        for i in range(self.count):
            if self.path(i).exists():
                journal.add(self.path(i))
        return journal


@dataclass
class Recovery:
    started: float  # s from "broker back" until the low water mark moved
    caught_up: float  # ... until it passed everything that was durable at that moment

    def __repr__(self) -> str:
        return f"drain started after {self.started:.1f}s, caught up after {self.caught_up:.1f}s"


class Pipeline:
    """A broker, two workers and the pump, with a monitor of the log's watermarks."""

    def __init__(
        self, tmp: Path, broker: str = "redis", overrides: Mapping[str, str] | None = None
    ) -> None:
        self.marks = tmp / "marks"
        self.marks.mkdir(parents=True)
        self.broker: Broker = make_broker(broker, tmp / broker)
        env = {**suite_env(self.marks), **self.broker.env(), **(overrides or {})}
        self.stack: Stack[Broker] = Stack(tmp, self.broker, overrides=env)
        self.workers: list[Proc] = []
        self.pump: Proc | None = None
        self.monitor = WalMonitor(self.snapshot, interval=0.1)

    # ------------------------------------------------------------------ processes
    def start_workers(self, n: int, *, wait: bool = True, **env: str) -> None:
        new = [self.stack.start_worker(app="fault_app", wait=False, env=env) for _ in range(n)]
        self.workers += new
        if wait:
            for proc in new:
                wait_worker(proc)

    def start_pump(self, app: str = "worker", **env: str) -> None:
        self.pump = self.stack.start_pump(env, app=app)

    def wait_log(self, proc: Proc, marker: str, timeout: float = 60) -> None:
        """Until ``marker`` is in the log of ``proc`` (what a case asserts it logs)."""
        proc.wait_ready(f"{marker!r} in the log of {proc.pid}",
                        lambda: marker in proc.log_text(), timeout)  # fmt: skip

    def heal(self) -> None:
        """Whatever an earlier case left dead is started again (as supervisors would),
        whatever it left stopped (SIGSTOP) is continued."""
        live = [p for p in (self.pump, *self.workers) if p is not None]
        kill_pids([p.pid for p in live if p.poll() is None], signal.SIGCONT)
        self.broker.heal()
        self.workers = [w for w in self.workers if w.poll() is None]
        self.start_workers(max(0, 2 - len(self.workers)))
        if self.pump is None or self.pump.poll() is not None:
            self.start_pump()

    def stop_strays(self, since: int) -> None:
        """Stop what a case started after ``since`` (its index in ``stack.procs``) and
        left running, other than workers and the pump: producers of a failed case."""
        keep = {id(p) for p in (self.pump, *self.workers)}
        for proc in self.stack.procs[since:]:
            if id(proc) not in keep:
                proc.stop(signal.SIGTERM, timeout=30)

    def stop_all(self) -> None:
        self.monitor.stop()
        self.stack.close()
        self.broker.resume()
        self.broker.stop()

    # ------------------------------------------------------------------ observations
    def snapshot(self) -> Snapshot:
        # walstore.inspect.snapshot lists the segments, then sizes them: a prune in
        # between (the live pump's) makes it raise FileNotFoundError. Look again.
        for _ in range(20):
            try:
                return snapshot(str(self.stack.wal_dir))
            except FileNotFoundError:
                time.sleep(0.05)
        return snapshot(str(self.stack.wal_dir))

    def recovery(
        self, since: float, timeout: float = 120, before: Snapshot | None = None
    ) -> Recovery:
        """Watch the low water mark from ``since`` (the broker back) on. ``before``: the
        log as it was at ``since``, when that was earlier than this call (a failover
        serves again while the test still waits out the old primary's outage); else
        now."""
        before = before or self.snapshot()
        wait_until("the low water mark to pass the backlog",
                   lambda: self.snapshot().low_water_mark >= before.high_water_mark,
                   timeout, 0.1)  # fmt: skip
        caught_up = time.monotonic() - since
        start = before.low_water_mark
        moved = [s.at - since for s in list(self.monitor.samples)
                 if s.at >= since and s.low_water_mark > start]  # fmt: skip
        return Recovery(moved[0] if moved else caught_up, caught_up)

    # ------------------------------------------------------------------ the verdict
    def check(
        self, prefix: str, journal: Journal, extra: Iterable[str] = (), dead: Iterable[int] = ()
    ) -> Audit:
        """Wait for the drain, then assert the contract for the purchases ``prefix...``
        (``extra``: acknowledged ones the test recorded itself; ``dead``: the LSNs of the
        only records that may be, and must be, dead-lettered)."""
        acked = set(journal.acked) | set(extra)
        attempted = journal.attempted | set(extra)

        def drained() -> bool:
            snap = self.stack.ledger()
            done = all(acked <= set(snap[t]) for t in TARGETS)
            return done and self.snapshot().pending == 0

        try:
            wait_until("the backlog to drain", drained, DRAIN_TIMEOUT, 0.3)
        except Exception:  # a timeout: say what is missing
            result = audit(attempted, acked, self.stack.ledger_url, prefix)
            raise AssertionError(f"not drained: {result.as_dict()} {self.snapshot()}") from None
        result = audit(attempted, acked, self.stack.ledger_url, prefix)
        assert result.lost == [], f"lost: {result.lost[:10]}"
        assert result.phantoms == [], f"effects of unknown purchases: {result.phantoms[:10]}"
        assert result.double_effects == 0
        assert all(result.effects[t] >= len(acked) for t in TARGETS), result.as_dict()
        status = subprocess.run([WALSTORE, "status", str(self.stack.wal_dir), "--json"],
                                capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
        assert json.loads(status.stdout)["pending"] == 0
        assert sorted(d.lsn for d in DeadLetterStore(str(self.stack.wal_dir)).list()) == sorted(
            dead
        )
        return result

    def all_workers_consuming(self) -> None:
        """Every worker outlived the fault (none exited: see walrelay.worker.redis_transport) and
        took tasks since its latest (re)connection, not just one of them."""
        for worker in self.workers:
            assert worker.poll() is None, f"worker {worker.pid} exited with {worker.returncode}"
            log = self.stack.log_of(worker)
            since = log[log.rfind("Connected to") :]
            assert since.startswith("Connected to") and " received" in since, worker.pid

    def ack_queue_length(self) -> int:
        return self.broker.depth(ack_queue(self.snapshot().wal_id))

    def queued(self) -> int:
        return self.broker.depth("warehouse") + self.broker.depth("finance")


@contextlib.contextmanager
def running_pipeline(
    tmp: Path, broker: str = "redis", overrides: Mapping[str, str] | None = None
) -> Iterator[Pipeline]:
    """The broker, two workers, the pump and the monitor, all stopped at the end
    (``overrides``: environment of every process, over the suite's)."""
    pipeline = Pipeline(tmp, broker, overrides)
    try:
        pipeline.broker.start()
        pipeline.start_workers(2)
        pipeline.start_pump()
        pipeline.monitor.start()
        yield pipeline
    finally:
        pipeline.stop_all()


@contextlib.contextmanager
def one_case(pipe: Pipeline) -> Iterator[None]:
    """A case of a shared pipeline: healed first; its stray producers stopped after."""
    pipe.heal()
    started = len(pipe.stack.procs)
    try:
        yield
    finally:
        pipe.stop_strays(started)  # a failed case must not leave producers appending


@contextlib.contextmanager
def paused(pids: list[int]) -> Iterator[None]:
    """SIGSTOP these processes for the block; SIGCONT them whatever happens."""
    kill_pids(pids, signal.SIGSTOP)
    try:
        yield
    finally:
        kill_pids(pids, signal.SIGCONT)


def report(case: str, **figures: object) -> None:
    """One line per case for the README's table (shown with ``pytest -s``)."""
    text = " ".join(f"{k}={v}" for k, v in figures.items())
    print(f"\nFAULTS {case}: {text}", flush=True)
