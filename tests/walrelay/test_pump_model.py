"""The pump as a state machine (issue 9), property-based: the real ``Pump`` on a real log
(in tmpfs) against a model of a broker and its workers, with a simulated clock.

The broker: FIFO queues consumed by slow workers (a few tasks a second each) that may
lose a delivery (taken, never acked), run one twice, or ack without naming the copy (an
older worker); tasks that fail a few times or always; the broker restarting empty (a new
session), going away and coming back (a reconnection); workers stopping for a while.
Records: good ones, and poison of every kind, alone or beside good tasks in the same
record: undecodable bytes, a task name or queue the policy refuses, a task that cannot
be encoded (a lone surrogate), a queue the broker refuses (WRONGTYPE), a queue no worker
consumes. Version-2 options: countdowns (held by the pump, carried forward when long),
expiries, order keys. The pump: read errors that lose what the failed read parsed, a
dead-letter store that cannot write, crashes (between steps and in the middle of a
publish) and restarts.

Invariants, after every step:
- nothing below the low water mark (persisted or the pump's own) is unconfirmed and not
  dead-lettered;
- no dead letter without a reason: every dead task is poison or failed or was lost at
  least once (and its attempts were real failures and losses);
- no loss counted that did not happen (losses <= deliveries the model dropped);
- copies published per task <= 1 + broker sessions + pump restarts + its failures + its
  lost deliveries + batches of its that the broker refused + one per max ack timeout it
  waited (a queue not moving);
- no task published before its eta; no record of an order key published before every
  earlier record of its key is done (confirmed, dead-lettered or expired);
and ``drain_and_check``: with the broker up and the workers running, every record ends
confirmed or dead-lettered and the low water mark reaches the end of the log.

More examples: ``PUMP_MODEL_EXAMPLES=20000 pytest tests/walrelay/test_pump_model.py``
(``PUMP_MODEL_STEPS`` sets the steps per example).
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import tempfile
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from tests.support.faultfs import SimulatedCrash
from tests.support.pumpmodel import FaultyLetters, FaultyLog, ModelBroker, TaskModel, Workers
from tests.support.pumprig import Clock
from walrelay.broker import TaskMessage
from walrelay.deadletters import DeadLetter
from walrelay.policy import TaskPolicy
from walrelay.pump import Pump, PumpConfig
from walrelay.record import Entry, TaskSpec, task_id
from walstore import Options, SyncPolicy, Wal

EXAMPLES = int(os.environ.get("PUMP_MODEL_EXAMPLES", "1000"))
STEPS = int(os.environ.get("PUMP_MODEL_STEPS", "30"))
pytestmark = pytest.mark.timeout(max(600, EXAMPLES * STEPS // 20))  # ~0.1 s per example

CONFIG = PumpConfig(
    window=6, read_batch=4, ack_timeout=2.0, max_ack_timeout=10.0, retry_delay=1.0,
    max_retry_delay=8.0, max_attempts=3, stall_timeout=300.0, carry_after=60.0, max_parked=5,
    checkpoint_interval=0.5, session_interval=0.5, idle_wait=0.5, ack_interval=0.5,
    max_reconnect_delay=2.0, log_interval=1e9,
)  # fmt: skip
QUEUES = ("warehouse", "finance")  # consumed
TANGLED = "tangled"  # a broker key that is not a list: the broker refuses it
NOBODY = "nobody"  # allowed, never consumed
POLICY = TaskPolicy(frozenset({"m.work"}), frozenset({*QUEUES, TANGLED, NOBODY}))
RATES = st.sampled_from([0.3, 1.0, 4.0])  # tasks/s a queue's workers run (slow: backlogs)
MAX_AWAY = 100.0  # workers and the broker come back within this (< stall_timeout)
POISON = ("unknown", "secret", "surrogate", "tangled", "nobody")
KINDS = st.sampled_from(["good"] * 6 + ["flaky1", "flaky2", "doomed", *POISON])
UNDECODABLE = st.sampled_from([b"\xff\xfe", b"[" * 3000, b'{"v": 9, "tasks": []}', b"{}"])
ETAS = st.none() | st.sampled_from([5.0, 30.0, 200.0])  # countdowns: seconds
EXPIRES = st.none() | st.none() | st.sampled_from([20.0, 400.0])
ORDER_KEYS = st.none() | st.sampled_from(["k1", "k2"])
FATES = st.lists(st.sampled_from(["ok"] * 6 + ["drop", "dup", "noecho"]), min_size=1, max_size=6)


class PumpMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.dir = tempfile.mkdtemp(prefix="pump-model-", dir=base)
        self.clock = Clock()
        options = Options(segment_bytes=4160, sync=SyncPolicy.NONE)
        self.wal = Wal.open(os.path.join(self.dir, "wal"), options)
        self.log = FaultyLog(self.wal)
        self.letters = FaultyLetters(os.path.join(self.dir, "wal"))
        self.tasks: dict[str, TaskModel] = {}
        self.broker = ModelBroker(self.wal.wal_id, self.tasks, self.landed)
        self.broker.wrong_type.add(TANGLED)
        self.workers = Workers(self.broker, QUEUES, 4.0)
        # Per LSN the model appended: target -> task id (None: undecodable); its order key.
        self.records: dict[int, dict[str, str] | None] = {}
        self.order_keys: dict[int, str] = {}
        self.down_since: float | None = None
        self.restarts = 0
        self.lost_before = 0  # losses counted by pumps that are gone
        self.lwm = 0
        self.pump = self.new_pump()

    def new_pump(self) -> Pump:
        return Pump(self.wal, self.broker, self.letters, CONFIG, clock=self.clock,
                    sleep=self.clock.advance, wall=self.clock.wall, policy=POLICY)  # fmt: skip

    def teardown(self) -> None:
        self.wal.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def landed(self, msg: TaskMessage) -> None:
        t = self.tasks[msg.task_id]
        t.copies += 1
        assert t.eta is None or self.clock.wall() >= t.eta, f"{msg.task_id} before its eta"
        if t.first_published is None:
            t.first_published = self.clock.now
            self.check_order(t.record)

    def check_order(self, lsn: int) -> None:
        """A record of an order key goes only once every earlier one of its key is done."""
        key = self.order_keys.get(lsn)
        if key is None:
            return
        letters = self.dead()
        for earlier, k in self.order_keys.items():
            if k == key and earlier < lsn:
                ids = self.records[earlier]
                assert ids is not None
                for target, tid in ids.items():
                    assert self.finished(tid, earlier, target, letters), (
                        f"record {lsn} of order key {key} published before {earlier} was done"
                    )

    def finished(self, tid: str, lsn: int, target: str, letters: dict[int, DeadLetter]) -> bool:
        t = self.tasks[tid]
        dead = lsn in letters and target in letters[lsn].targets
        expired = t.expires is not None and self.clock.wall() >= t.expires
        return t.succeeded or dead or expired

    # ------------------------------------------------------------------ the log
    @initialize(n=st.integers(0, 3))
    def start(self, n: int) -> None:
        for _ in range(n):
            self.append(["good"], None, None, None, None)

    @rule(kinds=st.lists(KINDS, min_size=1, max_size=3), undecodable=st.none() | UNDECODABLE,
          eta=ETAS, expires=EXPIRES, order_key=ORDER_KEYS)  # fmt: skip
    def append(
        self,
        kinds: list[str],
        undecodable: bytes | None,
        eta: float | None = None,
        expires: float | None = None,
        order_key: str | None = None,
    ) -> None:
        lsn = self.wal.next_lsn()
        if undecodable is not None:
            assert self.wal.append(undecodable) == lsn
            self.records[lsn] = None
            return
        specs, ids = [], {}
        wall = self.clock.wall()
        options: dict[str, Any] = {}
        if eta is not None:
            options["eta"] = wall + eta
        if expires is not None:
            options["expires"] = wall + expires
        for i, kind in enumerate(kinds):
            target = f"t{i}"
            queue = {"secret": "secret", "tangled": TANGLED, "nobody": NOBODY}.get(
                kind, QUEUES[(lsn + i) % 2]
            )
            name = "m.unknown" if kind == "unknown" else "m.work"
            args: list[Any] = ["\ud800"] if kind == "surrogate" else [lsn, target]
            specs.append(TaskSpec(target, name, queue, args, {}, dict(options)))
            budget = {"flaky1": 1, "flaky2": 2, "doomed": 10**9}.get(kind, 0)
            tid = task_id(self.wal.wal_id, lsn, target)
            self.tasks[tid] = TaskModel(kind, queue, budget, lsn, options.get("eta"),
                                        options.get("expires"))  # fmt: skip
            ids[target] = tid
        entry = Entry(f"k{lsn}", tuple(specs), order_key=order_key)
        assert self.wal.append(entry.encode()) == lsn
        self.records[lsn] = ids
        if order_key is not None:
            self.order_keys[lsn] = order_key

    def ids_at(self, lsn: int) -> dict[str, str] | None:
        """The tasks of the record at ``lsn``: one the model appended, or one the pump
        carried forward (the same tasks as its origin's)."""
        if lsn in self.records:
            return self.records[lsn]
        origin = self.records[self.log.carried[lsn]]
        assert origin is not None
        return origin

    # ------------------------------------------------------------------ time and workers
    @rule(seconds=st.sampled_from([0.2, 1.0, 3.0, 8.0, 25.0, 60.0]), fates=FATES)
    def advance(self, seconds: float, fates: list[str]) -> None:
        end = self.clock.now + seconds
        cycle = itertools.cycle(fates)
        while self.clock.now < end:
            step = min(2.0, end - self.clock.now)
            self.clock.advance(step)
            self.come_back()
            self.workers.work(step, cycle)
            self.step_pump()

    def come_back(self) -> None:
        now = self.clock.now
        for queue, since in list(self.workers.stopped.items()):
            if now - since >= MAX_AWAY:
                del self.workers.stopped[queue]
        if self.down_since is not None and now - self.down_since >= MAX_AWAY:
            self.broker_up()

    def step_pump(self) -> None:
        try:
            self.pump.step()
        except SimulatedCrash:
            self.restart_pump(graceful=False)

    @rule(queue=st.sampled_from(QUEUES))
    def stop_workers(self, queue: str) -> None:
        self.workers.stopped.setdefault(queue, self.clock.now)

    @rule(queue=st.sampled_from(QUEUES))
    def start_workers(self, queue: str) -> None:
        self.workers.stopped.pop(queue, None)

    @rule(queue=st.sampled_from(QUEUES), rate=RATES)
    def workers_rate(self, queue: str, rate: float) -> None:
        self.workers.rates[queue] = rate

    @rule(queue=st.sampled_from(QUEUES), seconds=st.sampled_from([12.0, 30.0, 60.0]),
          rate=RATES, fates=FATES)  # fmt: skip
    def workers_away_then_slow(
        self, queue: str, seconds: float, rate: float, fates: list[str]
    ) -> None:
        """Longer than the max ack timeout (the pump probes the queue), then a backlog."""
        self.stop_workers(queue)
        self.advance(seconds, fates)
        self.start_workers(queue)
        self.workers_rate(queue, rate)
        self.advance(seconds, fates)

    # ------------------------------------------------------------------ the broker
    @rule()
    def broker_restart(self) -> None:
        self.broker.restart()  # empty: every queued task and ack is gone

    @rule()
    def broker_down(self) -> None:
        self.broker.down = True
        if self.down_since is None:
            self.down_since = self.clock.now

    @rule()
    def broker_up(self) -> None:
        self.broker.down = False
        self.down_since = None

    # ------------------------------------------------------------------ the pump
    @rule(n=st.integers(1, 3))
    def read_errors(self, n: int) -> None:
        self.log.read_faults.extend([True] * n)

    @rule(broken=st.booleans())
    def dead_letter_store(self, broken: bool) -> None:
        self.letters.broken = broken

    @rule(graceful=st.booleans())
    def restart_pump(self, graceful: bool) -> None:
        if graceful:
            self.pump.checkpoint(force=True)
        self.lost_before += self.pump.stats.lost
        self.restarts += 1
        self.pump = self.new_pump()

    @rule()
    def crash_in_the_next_publish(self) -> None:
        self.broker.crash_next = True

    @rule()
    def drain_and_check(self) -> None:
        """Everything healed: every record ends confirmed or dead-lettered."""
        self.workers.stopped.clear()
        self.workers.rates = dict.fromkeys(QUEUES, 4.0)
        self.broker_up()
        self.log.read_faults.clear()
        self.letters.broken = False
        for _ in range(800):
            self.advance(5.0, ["ok"])
            if self.settled():
                break
        self.pump.checkpoint(force=True)
        end = self.wal.next_lsn()
        assert self.pump.low_water_mark() == self.wal.low_water_mark() == end, self.where()
        assert not self.pump.inflight and not len(self.pump.parking)
        self.check_below(end, self.dead())

    def settled(self) -> bool:
        pump = self.pump
        return (
            not pump.inflight
            and not len(pump.parking)
            and pump.low_water_mark() == self.wal.high_water_mark()
        )

    def where(self) -> str:
        return (f"now={self.clock.now} lwm={self.wal.low_water_mark()} "
                f"mem={self.pump.low_water_mark()} next={self.wal.next_lsn()} "
                f"inflight={list(self.pump.inflight)} stats={self.pump.stats}")  # fmt: skip

    # ------------------------------------------------------------------ invariants
    def dead(self) -> dict[int, DeadLetter]:
        return {d.lsn: d for d in self.letters.list()}

    def carried_above(self, lwm: int) -> set[int]:
        """Identities of the records the pump carried forward to LSNs at or above ``lwm``."""
        return {origin for lsn, origin in self.log.carried.items() if lsn >= lwm}

    def check_below(self, lwm: int, letters: dict[int, DeadLetter]) -> None:
        """Every task of every record below ``lwm`` is done, or its record was carried
        forward to an LSN not below ``lwm`` (the same task, still in the log)."""
        carried: set[int] | None = None
        first = self.wal.first_lsn()
        for lsn in range(lwm):
            if lsn not in self.records and lsn < first:
                # A copy the pump carried forward, since confirmed and pruned: its origin
                # (appended by the model, below it) is checked in its own right.
                continue
            ids = self.ids_at(lsn)
            if ids is None:
                assert lsn in letters, f"undecodable record {lsn} below the mark, no dead letter"
                continue
            identity = self.tasks[next(iter(ids.values()))].record
            for target, tid in ids.items():
                if self.finished(tid, identity, target, letters):
                    continue
                if carried is None:
                    carried = self.carried_above(lwm)
                assert identity in carried, (
                    f"task {tid} below the mark {lwm}: neither confirmed nor dead; {self.where()}"
                )

    @invariant()
    def hold(self) -> None:
        letters = self.dead()
        self.nothing_unconfirmed_below_the_watermark(letters)
        self.no_dead_letter_without_a_reason(letters)
        self.no_loss_counted_that_did_not_happen()
        self.copies_are_bounded()

    def nothing_unconfirmed_below_the_watermark(self, letters: dict[int, DeadLetter]) -> None:
        persisted = self.wal.low_water_mark()
        assert persisted >= self.lwm  # never back
        self.lwm = persisted
        self.check_below(max(persisted, self.pump.low_water_mark()), letters)

    def no_dead_letter_without_a_reason(self, letters: dict[int, DeadLetter]) -> None:
        for lsn, letter in letters.items():
            assert letter.reason
            ids = self.records[lsn]  # a dead letter keeps the identity of the first LSN
            if ids is None:
                assert "undecodable" in letter.reason
                continue
            for target, info in letter.targets.items():
                t = self.tasks[ids[target]]
                if t.kind in POISON:
                    continue
                assert t.failures + t.drops >= 1, (target, t, letter.reason)
                assert info["attempts"] <= t.failures + t.drops, (target, t, letter.reason)

    def no_loss_counted_that_did_not_happen(self) -> None:
        assert self.lost_before + self.pump.stats.lost <= self.workers.drops

    def copies_are_bounded(self) -> None:
        sessions = self.broker.generation
        for tid, t in self.tasks.items():
            if t.first_published is None:
                continue
            waited = self.clock.now - t.first_published
            bound = (1 + sessions + self.restarts + t.failures + t.drops + t.batch_failures
                     + math.floor(waited / CONFIG.max_ack_timeout) + 1)  # fmt: skip
            assert t.copies <= bound, (tid, t, sessions, self.restarts, waited)


PumpMachine.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestPump = PumpMachine.TestCase
