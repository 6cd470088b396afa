"""Which acks show a queue moving (reviews of 2026-11-30): an ack of a task no longer in
the window (a duplicate, a lost record's copy) counts for the queue and priority its copy
name tags, and for no other; odd copy names change nothing. The clock runs per queue and
priority: a priority no worker reads is dead-lettered, whatever its other priorities do."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from tests.support.pumprig import Rig
from walrelay.broker import Ack
from walrelay.record import TaskSpec, parse_task_id
from walstore import Wal

pytestmark = pytest.mark.timeout(60)
CONFIG: dict[str, Any] = {"stall_timeout": 300.0, "max_ack_timeout": 60.0, "ack_timeout": 30.0}

# Two ordinary per-tenant queue names whose lane tags were equal when tags were 4 bytes
# (found by counting up: i < 160,000); tags are 8 bytes now, and the test below makes
# every tag of these two equal to see that a shared tag credits neither.
CONSUMED, NOBODY = "tenant-76292", "tenant-156181"


class _Same:
    def hexdigest(self) -> str:
        return "ab" * 8


def _colliding(data: bytes = b"", **kwargs: Any) -> Any:
    if b"tenant-" in data:
        return _Same()
    return _blake2b(data, **kwargs)


_blake2b = hashlib.blake2b


@pytest.mark.parametrize("collide", [False, True])
def test_duplicates_of_one_queue_never_keep_another_queue_alive(
    wal: Wal, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, collide: bool
) -> None:
    if collide:
        monkeypatch.setattr(hashlib, "blake2b", _colliding)
    rig = Rig(wal, tmp_path, **CONFIG)
    rig.append_entry(TaskSpec("t", "x.task", CONSUMED), key="a")
    rig.steps(2)
    done = rig.take(CONSUMED)
    rig.append_entry(TaskSpec("t", "x.task", NOBODY), key="b")  # nobody consumes this queue
    rig.steps(2)
    rig.ack(done)
    rig.steps(2)
    for _ in range(100):  # 1000 s: the CONSUMED queue's workers run duplicates of `done`
        rig.ack(done)
        rig.run_for(10, every=1)
    # Expected: NOBODY's task dead-lettered as stalled after 300 s (as with any other name).
    assert rig.pump.stats.stalled == 1, rig.pump.stats
    assert not rig.pump.inflight


def test_a_stale_copy_without_a_queue_part_credits_no_queue(wal: Wal, tmp_path: Path) -> None:
    """Acks of a lost record's copies named by an earlier pump ("<run>.<pub>.<record>",
    no queue part), at the LSN a record for a queue nobody consumes now holds: the lost
    record's task ran on some other queue, so they credit no queue."""
    rig = Rig(wal, tmp_path, **CONFIG)
    lsn = rig.append_entry(TaskSpec("0", "x.task", "nobody"), key="n", created=1.0)
    rig.steps(2)
    for i in range(100):  # 1000 s of the old copies' acks (a consumed queue's backlog)
        rig.broker.send_ack(Ack(wal.wal_id, lsn, "0", True, None, f"0badc0de.{i + 1}.aaaaaaaaaaaa"))
        rig.run_for(10, every=1)
    # Stale while the record waits; once it is dead-lettered, duplicates.
    assert rig.pump.stats.stale_acks + rig.pump.stats.duplicate_acks == 100
    assert rig.pump.stats.stale_acks >= 30
    assert rig.pump.stats.stalled == 1, rig.pump.stats  # "nobody": dead-lettered at 300 s


def _dup(rig: Rig, msg: Any, copy: str | None, ok: bool = True) -> None:
    parsed = parse_task_id(msg.task_id)
    assert parsed is not None
    rig.broker.send_ack(Ack(*parsed, ok=ok, error=None if ok else "boom", copy=copy))


def test_duplicates_of_a_consumed_queue_do_not_keep_an_unconsumed_one_alive(
    wal: Wal, tmp_path: Path
) -> None:
    rig = Rig(wal, tmp_path, **CONFIG)
    rig.append(20)
    rig.steps(2)
    backlog = rig.take("warehouse")
    rig.pump = rig.new_pump()  # restart: the window goes again -> duplicates on warehouse
    rig.steps(2)
    backlog += rig.take("warehouse")
    for _ in range(120):  # warehouse worker drains, finance has nobody
        if backlog:
            rig.ack([backlog.pop(0)], ok=bool(len(backlog) % 2))  # also failure acks
        rig.run_for(10, every=1)
        backlog += rig.take("warehouse")
    assert rig.pump.stats.duplicate_acks > 0
    assert rig.pump.stats.stalled == 20, rig.pump.stats  # every finance task
    assert not rig.pump.inflight


ODD = [
    "",
    ".",
    "...",
    "....",
    "a.b.c.d.e.f",
    "x.y.z.\u00e9\u00e8",
    "\udc80.\udc80.\udc80.\udc80",
    "." * 200,
    "a.1.b." + "f" * 7,
    "a.1.b." + "f" * 9,
    "0.0.0.0",
    "é.².",
]


def test_odd_copy_strings_neither_crash_nor_credit_a_dead_queue(wal: Wal, tmp_path: Path) -> None:
    rig = Rig(wal, tmp_path, **CONFIG)
    rig.append(1)
    rig.steps(2)
    w = rig.take("warehouse")
    rig.ack(w)
    rig.steps(2)
    real = w[0].copy
    truncated = [real[:n] for n in range(len(real) + 1)]
    extra = [real + ".x", real + "..", real.replace(".", "..")]
    for _ in range(40):
        for copy in ODD + truncated + extra:
            _dup(rig, w[0], copy)
            _dup(rig, w[0], copy, ok=False)
        rig.run_for(10, every=1)
    assert rig.pump.stats.stalled == 1 and not rig.pump.inflight, rig.pump.stats


def _confirmed(rig: Rig) -> list[Any]:
    """One record published and confirmed; its warehouse copies (to ack again later)."""
    rig.append(1, prefix="old")
    rig.steps(2)
    old = rig.take("warehouse")
    rig.ack(old)
    rig.ack(rig.take("finance"))
    rig.steps(2)
    return old


def test_a_lost_task_is_probed_once_duplicates_stop(wal: Wal, tmp_path: Path) -> None:
    rig = Rig(wal, tmp_path, **CONFIG)
    old = _confirmed(rig)
    rig.append(1, prefix="new")
    rig.steps(2)
    rig.take("warehouse")  # lost
    rig.ack(rig.take("finance"))
    for _ in range(30):  # 300 s of duplicates of old: no probe needed yet
        rig.ack(old)
        rig.run_for(10, every=1)
    rig.run_for(130, every=1)
    again = rig.take("warehouse")
    assert again, rig.pump.stats
    rig.ack(again)
    rig.steps(3)
    assert not rig.pump.inflight and rig.pump.stats.dead_lettered == 0


def test_duplicates_at_another_priority_or_queue_do_not_credit_a_lane(
    wal: Wal, tmp_path: Path
) -> None:
    rig = Rig(wal, tmp_path, **CONFIG)
    rig.append_entry(TaskSpec("a", "t", "q", options={"priority": 9}), key="a")
    rig.append_entry(TaskSpec("b", "t", "q9"), key="b")  # a name whose repr resembles
    rig.steps(2)
    hi = rig.take("q")
    rig.ack(hi)
    rig.steps(2)
    rig.append_entry(TaskSpec("c", "t", "nobody", options={"priority": 9}), key="c")
    rig.steps(2)
    for _ in range(40):
        rig.ack(hi)
        rig.run_for(10, every=1)
    assert rig.pump.stats.stalled == 2, rig.pump.stats  # q9 and nobody


def test_order_keyed_and_carried_forward_tasks_of_a_dead_queue_still_stall(
    wal: Wal, tmp_path: Path
) -> None:
    rig = Rig(wal, tmp_path, carry_after=100.0, **CONFIG)
    old = _confirmed(rig)
    wall = rig.clock.wall()
    for i in range(3):
        rig.append_entry(TaskSpec("t", "x.task", "nobody"), key=f"k{i}", order_key="K")
    rig.append_entry(TaskSpec("t", "x.task", "nobody", options={"eta": wall + 250}), key="eta")
    rig.steps(2)
    for _ in range(150):  # 1500 s of duplicate acks on warehouse
        rig.ack(old)
        rig.run_for(10, every=1)
    assert rig.pump.stats.carried >= 1
    assert rig.pump.stats.stalled == 4, rig.pump.stats
    assert not rig.pump.inflight


def test_a_priority_no_worker_reads_is_dead_lettered(wal: Wal, tmp_path: Path) -> None:
    """Priority 9 of queue q is consumed, priority 5 never (review): its task goes to the
    dead letters after PUMP_STALL_TIMEOUT instead of holding the low water mark forever."""
    rig = Rig(wal, tmp_path, **CONFIG)
    rig.append_entry(TaskSpec("t", "x.task", "q", options={"priority": 5}), key="lo")
    rig.steps(2)
    for i in range(60):  # 600 s: priority 9 consumed, priority 5 never
        rig.append_entry(TaskSpec("t", "x.task", "q", options={"priority": 9}), key=f"h{i}")
        rig.steps(2)
        rig.ack([m for m in rig.take("q") if m.priority == 9])
        rig.run_for(10, every=1)
    assert rig.pump.stats.stalled == 1, rig.pump.stats
    assert rig.pump.stats.probes <= 600 / CONFIG["max_ack_timeout"]
