"""Issue 9: the pump never loses or floods. The in-memory broker, a real (temporary) log
and a fake clock: the low water mark against read errors and records that break the
pump; slow queues, stalled queues and lost messages; poison records of every kind."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from tests.support.pumprig import FlakyReader, Rig
from walrelay.deadletters import DeadLetter
from walrelay.policy import TaskPolicy
from walrelay.record import TaskSpec, decode, task_id
from walstore import CorruptLogError, Wal
from walstore.format import SEGMENT_SUFFIX

pytestmark = pytest.mark.timeout(60)

TASKS = frozenset({"tasks.warehouse.reserve_stock", "tasks.finance.record_revenue"})


def lwm_history(rig: Rig, steps: int) -> list[int]:
    """Step ``steps`` times (the clock moving 0.1 s), persisted low water mark after each."""
    out = []
    for _ in range(steps):
        rig.pump.step()
        rig.clock.advance(0.1)
        out.append(rig.wal.low_water_mark())
    return out


def published_lsns(rig: Rig, queue: str = "warehouse") -> list[int]:
    return [int(m.task_id.split("-")[1]) for m in rig.broker.queues.get(queue, [])]


# ------------------------------------------------------------------ 1. the low water mark
def flip_a_byte_in_the_second_segment(wal: Wal) -> int:
    """Corrupt a record in the middle of the second of several sealed segments; returns
    the LSN of the first record a reader cannot get past."""
    names = sorted(n for n in os.listdir(wal.directory) if n.endswith(SEGMENT_SUFFIX))
    assert len(names) >= 4, names
    path = os.path.join(wal.directory, names[1])
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    reader = wal.reader(0)
    try:
        while True:
            reader.read(1)
    except CorruptLogError:
        return reader.next_lsn
    finally:
        reader.close()


def test_a_corrupt_sealed_segment_never_lets_the_watermark_pass_unpublished_records(
    wal: Wal, tmp_path: Path
) -> None:
    rig = Rig(wal, tmp_path)
    rig.append(100)  # ~24 records per 8 KiB segment
    bad = flip_a_byte_in_the_second_segment(wal)
    marks = lwm_history(rig, 30)
    assert max(marks) == 0  # nothing confirmed yet: the mark has not moved
    assert published_lsns(rig) == list(range(bad))  # everything before the bad spot, once
    rig.ack_everything()
    marks = lwm_history(rig, 30)
    rig.pump.checkpoint(force=True)  # what run() does on the way out
    assert max(marks) == wal.low_water_mark() == bad
    assert rig.pump.stats.read_errors > 0
    assert rig.take("warehouse") == []  # nothing past it was published or skipped


def test_records_read_in_a_call_that_failed_are_read_again(
    wal: Wal, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_reader = wal.reader
    fail = [True]
    monkeypatch.setattr(wal, "reader", lambda lsn=None: FlakyReader(real_reader(lsn), fail))
    rig = Rig(wal, tmp_path)
    rig.append(10)
    marks = lwm_history(rig, 20)
    assert max(marks) == 0
    assert published_lsns(rig) == list(range(10))
    rig.ack_everything()
    rig.steps(2)
    assert wal.low_water_mark() == 10 and rig.pump.stats.read_errors == 1


def test_a_record_that_crashes_the_decoder_goes_to_the_dead_letters_alone(
    wal: Wal, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pump does not rely on decode raising only BadRecordError."""

    def decode_that_recurses(payload: bytes) -> Any:
        if payload.startswith(b"[[[["):
            raise RecursionError("maximum recursion depth exceeded")
        return decode(payload)

    monkeypatch.setattr("walrelay.pump.decode", decode_that_recurses)
    rig = Rig(wal, tmp_path)
    rig.append(5, "a")
    wal.append(b"[" * 50_000)
    rig.append(5, "b")
    marks = lwm_history(rig, 5)
    assert max(marks) == 0
    assert published_lsns(rig) == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10]
    (letter,) = rig.deadletters.list()
    assert letter.lsn == 5 and "RecursionError" in letter.reason
    rig.ack_everything()
    rig.steps(2)
    assert wal.low_water_mark() == 11


def test_a_dead_letter_that_cannot_be_written_holds_everything_behind_it(
    wal: Wal, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = Rig(wal, tmp_path)
    real_add = rig.deadletters.add
    failing = [True]

    def add(letter: DeadLetter) -> None:
        if failing:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_add(letter)

    monkeypatch.setattr(rig.deadletters, "add", add)
    rig.append(2, "a")
    wal.append(b"\xff not json")
    rig.append(2, "b")
    lwm_history(rig, 5)
    assert published_lsns(rig) == [0, 1]  # the records behind it wait
    rig.ack_everything()
    marks = lwm_history(rig, 20)
    assert max(marks) == 2 and rig.pump.stats.read_errors > 0
    failing.clear()  # the disk has room again
    lwm_history(rig, 40)
    assert [d.lsn for d in rig.deadletters.list()] == [2]
    assert published_lsns(rig) == [3, 4]
    rig.ack_everything()
    rig.steps(2)
    assert wal.low_water_mark() == 5


# ------------------------------------------------------------------ 2. slow consumers
def consume(rig: Rig, seconds: float, per_second: float, echo: bool = True) -> int:
    """Run a worker per queue taking ``per_second`` tasks/s (acked at once) for
    ``seconds`` while the pump steps; returns the task runs."""
    runs, credit = 0, 0.0
    end = rig.clock.now + seconds
    while rig.clock.now < end:
        rig.pump.step()
        rig.clock.advance(0.1)
        credit += 0.1 * per_second
        while credit >= 1:
            credit -= 1
            for queue in ("warehouse", "finance"):
                got = rig.take(queue, 1)
                rig.ack(got, echo=echo)
                runs += len(got)
    return runs


@pytest.mark.parametrize("echo", [True, False], ids=["copy-echoed", "older-workers"])
def test_a_slow_queue_is_neither_resent_nor_counted_lost(
    wal: Wal, tmp_path: Path, echo: bool
) -> None:
    """60 tasks per queue drained at 0.5/s: the last waits 2 min, 24 ack timeouts and
    6 max ack timeouts. Each runs once; no loss counted; nothing dead."""
    rig = Rig(wal, tmp_path, ack_timeout=5.0, max_ack_timeout=20.0, max_attempts=2)
    rig.append(60)
    runs = consume(rig, 150, 0.5, echo=echo)
    assert runs == 120 and rig.pump.stats.published == 120
    assert rig.pump.stats.lost == 0 and rig.pump.stats.probes == 0
    assert rig.deadletters.list() == [] and wal.low_water_mark() == 60


def test_an_ack_of_an_old_copy_does_not_condemn_the_tasks_behind_it(
    wal: Wal, tmp_path: Path
) -> None:
    """Workers down past the max ack timeout: the oldest task of each queue is re-sent
    (a probe) to the end of its queue. When the workers come back they run its first
    copy first; that ack says nothing about the tasks queued after the first copy."""
    rig = Rig(wal, tmp_path, ack_timeout=5.0, max_ack_timeout=30.0, max_attempts=2)
    rig.append(40)
    rig.run_for(70)
    probes = rig.pump.stats.probes
    assert 2 <= probes <= 6
    runs = consume(rig, 200, 0.5)
    assert runs == rig.pump.stats.published == 80 + probes  # the probes ran too, nothing else
    assert rig.pump.stats.lost == 0 and rig.deadletters.list() == []
    assert wal.low_water_mark() == 40


def test_a_reconnection_costs_one_copy_per_task_in_flight(wal: Wal, tmp_path: Path) -> None:
    """Copies of a task re-sent after a new broker session sit behind the original ones:
    their acks prove nothing about the tasks queued after the originals."""
    rig = Rig(wal, tmp_path, ack_timeout=5.0, max_ack_timeout=1000.0)
    rig.append(20)
    rig.steps(1)
    rig.broker.down = True  # a reconnection: queued tasks stay, but may have been lost
    rig.steps(1)
    rig.broker.down = False
    rig.steps(2)
    assert rig.pump.stats.redelivered == 40  # every task has a second copy behind
    runs = consume(rig, 200, 0.5)
    assert runs == 80  # the duplicates the new session required, no more
    assert rig.pump.stats.published == 80 and rig.pump.stats.lost == 0


def test_a_stopped_queue_gets_one_probe_per_quiet_period(wal: Wal, tmp_path: Path) -> None:
    rig = Rig(wal, tmp_path, ack_timeout=5.0, max_ack_timeout=60.0, stall_timeout=10_000.0)
    rig.append(50)
    rig.run_for(600)  # no worker at all for 10 minutes
    # One re-send per queue per quiet period (none of them counted as a failed attempt).
    assert 2 * 8 <= rig.pump.stats.probes <= 2 * 10
    assert rig.pump.stats.published == 100 + rig.pump.stats.probes
    assert all(t.attempts == 0 for f in rig.pump.inflight.values() for t in f.targets.values())


def test_tasks_lost_silently_on_an_idle_queue_are_recovered(wal: Wal, tmp_path: Path) -> None:
    rig = Rig(wal, tmp_path, ack_timeout=5.0, max_ack_timeout=30.0)
    rig.append(5)
    rig.steps(1)
    rig.ack(rig.take("finance"))
    lost = rig.take("warehouse")  # taken by a worker that died without a trace
    assert len(lost) == 5
    rig.run_for(40)  # the oldest is re-sent to see if the queue moves
    probe = rig.take("warehouse")
    assert [m.task_id for m in probe] == [task_id(wal.wal_id, 0, "warehouse")]
    rig.ack(probe)  # it does: the four published before the probe were lost
    rig.run_for(12)
    again = rig.take("warehouse")
    assert sorted(m.task_id for m in again) == [
        task_id(wal.wal_id, n, "warehouse") for n in (1, 2, 3, 4)
    ]
    rig.ack(again)
    rig.steps(2)
    assert wal.low_water_mark() == 5 and rig.pump.stats.lost == 4


# ------------------------------------------------------------------ 3. poison records
def test_a_queue_the_broker_refuses_is_dead_lettered_the_rest_flows(
    wal: Wal, tmp_path: Path
) -> None:
    rig = Rig(wal, tmp_path, retry_delay=1.0, max_attempts=3)
    rig.broker.wrong_type.add("unacked")
    rig.append(3, "a")
    rig.append_entry(TaskSpec("t", "tasks.warehouse.reserve_stock", "unacked", [1]), key="bad")
    rig.append(3, "b")
    for _ in range(10):
        rig.run_for(2)
        rig.drain(1)
    assert not rig.pump.stats.broker_down and rig.pump.stats.broker_sessions == 1
    (letter,) = rig.deadletters.list()
    assert letter.lsn == 3 and letter.key == "bad"
    assert letter.targets["t"]["attempts"] == 3 and "WRONGTYPE" in letter.targets["t"]["error"]
    assert wal.low_water_mark() == 7
    # Each good task once, plus the one re-publication of its batch that found the culprit.
    assert rig.pump.stats.published <= 12 + 6 + 2


def test_a_task_that_cannot_be_encoded_is_dead_lettered_the_rest_flows(
    wal: Wal, tmp_path: Path
) -> None:
    rig = Rig(wal, tmp_path, retry_delay=1.0, max_attempts=2)
    good = TaskSpec("warehouse", "tasks.warehouse.reserve_stock", "warehouse", ["fine"])
    bad = TaskSpec("finance", "tasks.finance.record_revenue", "finance", ["\ud800"])
    wal.append(b'{"v":1,"key":"s","tasks":[' + b'{"target":"warehouse","name":"tasks.warehouse.'
               b'reserve_stock","queue":"warehouse","args":["fine"],"kwargs":{}},{"target":'
               b'"finance","name":"tasks.finance.record_revenue","queue":"finance","args":'
               b'["\\ud800"],"kwargs":{}}]}')  # fmt: skip
    assert [t.args for t in decode(wal.reader(0).read(1)[0][1]).tasks] == [good.args, bad.args]
    rig.append(2)
    for _ in range(10):
        rig.run_for(1)
        rig.drain(1)
    (letter,) = rig.deadletters.list()
    assert list(letter.targets) == ["finance"] and "surrogate" in letter.reason
    assert wal.low_water_mark() == 3 and rig.pump.stats.published == 5


def test_a_queue_nobody_consumes_is_dead_lettered_after_the_stall_timeout(
    wal: Wal, tmp_path: Path
) -> None:
    rig = Rig(wal, tmp_path, ack_timeout=5.0, max_ack_timeout=30.0, stall_timeout=120.0)
    rig.append_entry(TaskSpec("a", "x.ok", "warehouse"), TaskSpec("b", "x.ok", "nobody"))
    for _ in range(40):
        rig.run_for(5)
        rig.ack(rig.take("warehouse"))
    (letter,) = rig.deadletters.list()
    assert list(letter.targets) == ["b"] and "did not move" in letter.reason
    assert wal.low_water_mark() == 1 and rig.pump.stats.stalled == 1
    assert rig.pump.stats.published <= 2 + 120 // 30  # probes: one per quiet period


def test_a_long_worker_outage_is_not_a_dead_queue(wal: Wal, tmp_path: Path) -> None:
    rig = Rig(wal, tmp_path, ack_timeout=5.0, max_ack_timeout=60.0, stall_timeout=600.0)
    rig.append(10)
    rig.run_for(500)  # workers down for most of the stall timeout
    consume(rig, 60, 10)
    assert rig.deadletters.list() == [] and wal.low_water_mark() == 10


def test_broker_outages_do_not_count_as_a_dead_queue(wal: Wal, tmp_path: Path) -> None:
    rig = Rig(wal, tmp_path, ack_timeout=5.0, max_ack_timeout=60.0, stall_timeout=100.0)
    rig.append(3)
    rig.steps(1)
    rig.broker.down = True
    rig.run_for(300)
    rig.broker.down = False
    rig.run_for(20)
    assert rig.deadletters.list() == []
    consume(rig, 30, 10)
    assert wal.low_water_mark() == 3


# ------------------------------------------------------------------ 4. what may be published
def test_only_registered_tasks_to_allowed_queues_are_published(wal: Wal, tmp_path: Path) -> None:
    policy = TaskPolicy(TASKS | {"shop.other"}, frozenset({"warehouse", "finance", "other"}))
    rig = Rig(wal, tmp_path, policy=policy)
    rig.append(1, "ok")
    bad = [
        TaskSpec("t", "celery.backend_cleanup", "warehouse"),
        TaskSpec("t", "evil.rm_rf", "warehouse"),
        TaskSpec("t", "tasks.warehouse.reserve_stock", "secret"),
    ]
    for spec in bad:
        rig.append_entry(spec)
    rig.append_entry(TaskSpec("t", "shop.other", "other", [1]), TaskSpec("u", "evil.x", "other"))
    rig.steps(2)
    other = rig.take("other")
    assert [m.name for m in other] == ["shop.other"]
    rig.ack(other)
    rig.drain(2)
    letters = {d.lsn: d.reason for d in rig.deadletters.list()}
    assert sorted(letters) == [1, 2, 3, 4]
    assert "Celery's own" in letters[1] and "not registered" in letters[2]
    assert "queue 'secret'" in letters[3] and "evil.x" in letters[4]
    assert wal.low_water_mark() == 5 and rig.pump.stats.published == 3


RESERVED = ["unacked", "_kombu.binding.warehouse", "walstore.acks.x", "celeryev.123",
            "w1@host.celery.pidbox", "q\x06\x163"]  # fmt: skip


@pytest.mark.parametrize("queue", RESERVED)
def test_the_brokers_own_keys_are_never_published_to(queue: str) -> None:
    policy = TaskPolicy(TASKS)
    reason = policy(TaskSpec("t", "tasks.warehouse.reserve_stock", queue))
    assert reason is not None and "reserved" in reason
    assert policy(TaskSpec("t", "tasks.warehouse.reserve_stock", "warehouse")) is None


def test_the_reason_of_a_refusal_is_kept_when_found_alone(wal: Wal, tmp_path: Path) -> None:
    """A batch refused without saying which (WRONGTYPE) is published one by one: an
    unencodable task in it keeps its own reason."""
    rig = Rig(wal, tmp_path, retry_delay=1.0, max_attempts=1)
    rig.broker.wrong_type.add("tangled")
    rig.append_entry(
        TaskSpec("a", "x.ok", "tangled"), TaskSpec("b", "x.ok", "warehouse", ["\ud800"])
    )
    rig.steps(2)
    (letter,) = rig.deadletters.list()
    assert "WRONGTYPE" in letter.targets["a"]["error"]
    assert "surrogate" in letter.targets["b"]["error"]
