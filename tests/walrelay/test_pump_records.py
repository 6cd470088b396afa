"""The pump side of record format v2 (walrelay/record.py), against the in-memory broker
with a simulated clock: options carried to the message, expiry, countdowns held by the
pump (durably, carried forward when long), order keys, and version-1 records replayed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.pumprig import WALL_START, Rig
from walrelay.record import TaskSpec, decode, task_id
from walstore import Wal

pytestmark = pytest.mark.timeout(60)


def spec(target: str = "t", queue: str = "q", **options: Any) -> TaskSpec:
    return TaskSpec(target, "shop.task", queue, [target], {}, options)


def in_(seconds: float) -> float:
    """The unix time ``seconds`` from the start of the rig's fake wall clock."""
    return WALL_START + seconds


# ------------------------------------------------------------------ options
def test_options_reach_the_message(wal: Wal, tmp_path: Path) -> None:
    rig = Rig(wal, tmp_path)
    rig.append_entry(
        spec("a", "q", expires=in_(600), priority=7, headers={"tenant": "acme"}),
        spec("b", "q", exchange="topic", routing_key="q.eu"),
        spec("c", "q", exchange="q", routing_key="q"),  # Celery's default: a direct exchange
    )
    rig.steps(1)
    a, b, c = rig.take("q")
    assert (a.expires, a.priority, a.headers) == (in_(600), 7, {"tenant": "acme"})
    assert (b.exchange, b.routing_key) == ("topic", "q.eu")
    assert (c.exchange, c.routing_key) == ("", "")  # the default exchange, by queue name
    assert a.copy and a.copy != b.copy  # every publication names itself


def test_bad_options_dead_letter_the_task_alone(wal: Wal, tmp_path: Path) -> None:
    rig = Rig(wal, tmp_path)
    rig.append_entry(spec("ok"), spec("p", priority="high"), spec("r", routing_key="other"),
                     spec("e", eta="tomorrow"))  # fmt: skip
    rig.drain(2)
    (letter,) = rig.deadletters.list()
    assert sorted(letter.targets) == ["e", "p", "r"]
    assert "priority" in letter.reason and "routing key" in letter.reason and "eta" in letter.reason
    assert wal.low_water_mark() == 1


def test_a_task_expired_before_it_is_due_is_confirmed_without_publishing(
    wal: Wal, tmp_path: Path
) -> None:
    """Workers drop an expired task without a word (no task_failure): the pump confirms
    it itself, and counts it."""
    rig = Rig(wal, tmp_path)
    rig.append_entry(spec("late", expires=in_(-1)), spec("fine", expires=in_(600)))
    rig.steps(1)
    assert [m.task_id for m in rig.take("q")] == [task_id(wal.wal_id, 0, "fine")]
    assert rig.pump.stats.expired == 1
    rig.append_entry(spec("held", eta=in_(100), expires=in_(50)))  # expires while held
    rig.run_for(120)
    assert rig.take("q") == [] and rig.pump.stats.expired == 2
    assert wal.low_water_mark() == 0  # "fine" not confirmed yet


def test_a_task_unconfirmed_at_its_expiry_is_confirmed_by_the_pump(
    wal: Wal, tmp_path: Path
) -> None:
    rig = Rig(wal, tmp_path, ack_timeout=5.0, max_ack_timeout=1000.0)
    rig.append_entry(spec("t", expires=in_(30)))
    rig.steps(1)
    assert len(rig.take("q")) == 1  # queued behind a backlog, say: no ack
    rig.run_for(25)
    assert wal.low_water_mark() == 0
    rig.run_for(10)
    assert wal.low_water_mark() == 1 and rig.pump.stats.expired == 1
    assert rig.deadletters.list() == []


# ------------------------------------------------------------------ countdowns
def test_a_countdown_is_held_by_the_pump_and_published_when_due(wal: Wal, tmp_path: Path) -> None:
    rig = Rig(wal, tmp_path)
    rig.append_entry(spec("t", eta=in_(60)))
    rig.append(2)
    rig.run_for(59)
    assert rig.take("q") == []  # not before its eta (and never as a broker ETA)
    assert rig.pump.stats.parked == 0 or len(rig.pump.parking) == 1
    rig.ack_everything()
    rig.run_for(5)
    assert wal.low_water_mark() == 0  # the held record holds the mark: nothing lost
    rig.run_for(2)
    (msg,) = rig.take("q")
    assert msg.task_id == task_id(wal.wal_id, 0, "t")
    rig.ack([msg])
    rig.steps(2)
    assert wal.low_water_mark() == 3


def test_a_restarted_pump_resumes_the_wait(wal: Wal, tmp_path: Path) -> None:
    rig = Rig(wal, tmp_path)
    rig.append_entry(spec("t", eta=in_(60)))
    rig.run_for(30)
    rig.pump.checkpoint(force=True)
    rig.pump = rig.new_pump()  # a restart: the wait is in the log, not in memory
    rig.run_for(29)
    assert rig.take("q") == []
    rig.run_for(2)
    assert len(rig.take("q")) == 1


def test_a_long_countdown_is_carried_forward_and_keeps_its_task_id(
    wal: Wal, tmp_path: Path
) -> None:
    rig = Rig(wal, tmp_path, carry_after=100.0)
    rig.append_entry(spec("t", eta=in_(3 * 86400)), key="remind")  # three days
    rig.append(40)  # a few segments of other work behind it
    rig.run_for(10)
    rig.ack_everything()
    rig.run_for(200)  # carried: appended again, the old LSN released
    assert rig.pump.stats.carried >= 1
    carried = [decode(p) for _, p in wal.reader(41).read(10)]
    assert carried and all(e.origin == 0 and e.key == "remind" for e in carried)
    assert wal.low_water_mark() > 40  # the old segments are no longer pinned
    assert wal.status().segments <= 2
    rig.clock.advance(3 * 86400)
    rig.run_for(2)
    (msg,) = rig.take("q")
    assert msg.task_id == task_id(wal.wal_id, 0, "t")  # the first LSN's identity
    rig.ack([msg])
    rig.steps(2)
    assert wal.low_water_mark() == wal.next_lsn()


def test_a_carried_record_found_twice_is_published_once(wal: Wal, tmp_path: Path) -> None:
    """A crash between appending the carried copy and releasing the original: after the
    restart both are in the log; one publication, one confirmation."""
    rig = Rig(wal, tmp_path, carry_after=10.0, checkpoint_interval=1e9)
    rig.append_entry(spec("t", eta=in_(300)))
    rig.run_for(15)
    assert rig.pump.stats.carried == 1
    assert wal.low_water_mark() == 0  # the release of LSN 0 not persisted: then a crash
    assert decode(wal.reader(1).read(1)[0][1]).origin == 0
    rig.pump = rig.new_pump()
    rig.run_for(300)
    (msg,) = rig.take("q")
    assert msg.task_id == task_id(wal.wal_id, 0, "t")
    rig.ack([msg])
    rig.steps(2)
    rig.pump.checkpoint(force=True)
    assert wal.low_water_mark() == wal.next_lsn()


# ------------------------------------------------------------------ order keys
def test_records_of_an_order_key_go_one_at_a_time_in_lsn_order(wal: Wal, tmp_path: Path) -> None:
    rig = Rig(wal, tmp_path)
    for n in range(3):
        rig.append_entry(spec(f"a{n}"), spec(f"b{n}", "r"), order_key="acct-1")
    rig.append_entry(spec("other"), order_key="acct-2")
    rig.steps(2)
    first = rig.take("q")
    assert [m.task_id.rsplit("-", 1)[1] for m in first] == ["a0", "other"]
    rig.ack(first)
    rig.steps(2)
    assert rig.take("q") == []  # b0 still unconfirmed: record 1 waits
    rig.ack(rig.take("r"))
    rig.steps(2)
    assert [m.task_id.rsplit("-", 1)[1] for m in rig.take("q")] == ["a1"]


def test_a_dead_lettered_record_lets_its_order_key_go_on(wal: Wal, tmp_path: Path) -> None:
    rig = Rig(wal, tmp_path, retry_delay=1.0, max_attempts=2)
    rig.append_entry(spec("a"), order_key="k")
    rig.append_entry(spec("b"), order_key="k")
    rig.steps(1)
    rig.ack(rig.take("q"), ok=False, error="boom")
    rig.run_for(3)
    rig.ack(rig.take("q"), ok=False, error="boom")
    rig.run_for(3)
    assert [d.lsn for d in rig.deadletters.list()] == [0]
    assert [m.task_id.rsplit("-", 1)[1] for m in rig.take("q")] == ["b"]


def test_an_order_key_survives_a_pump_restart(wal: Wal, tmp_path: Path) -> None:
    rig = Rig(wal, tmp_path)
    for n in range(3):
        rig.append_entry(spec(f"a{n}"), order_key="k")
    rig.steps(2)
    rig.ack(rig.take("q"))
    rig.steps(2)
    assert len(rig.take("q")) == 1  # a1, published, not confirmed
    rig.pump = rig.new_pump()
    rig.steps(3)
    again = rig.take("q")
    assert [m.task_id.rsplit("-", 1)[1] for m in again] == ["a1"]  # again, alone
    rig.ack(again)
    rig.drain(4)
    assert wal.low_water_mark() == 3


def test_an_order_key_waits_for_a_held_record(wal: Wal, tmp_path: Path) -> None:
    rig = Rig(wal, tmp_path)
    rig.append_entry(spec("a", eta=in_(30)), order_key="k")
    rig.append_entry(spec("b"), order_key="k")
    rig.run_for(20)
    assert rig.take("q") == []
    rig.run_for(15)
    (a,) = rig.take("q")
    rig.ack([a])
    rig.steps(2)
    assert [m.task_id.rsplit("-", 1)[1] for m in rig.take("q")] == ["b"]


# ------------------------------------------------------------------ the previous release
V1 = (b'{"v":1,"key":"p-1","tasks":[{"target":"warehouse","name":"tasks.warehouse.'
      b'reserve_stock","queue":"warehouse","args":[{"purchase_id":"p-1"}],"kwargs":{}},'
      b'{"target":"finance","name":"tasks.finance.record_revenue","queue":"finance",'
      b'"args":[{"purchase_id":"p-1"}],"kwargs":{}}]}')  # fmt: skip


def test_version_1_records_still_replay(wal: Wal, tmp_path: Path) -> None:
    rig = Rig(wal, tmp_path)
    wal.append(V1)
    rig.append(1)
    rig.steps(1)
    wh, fi = rig.take("warehouse"), rig.take("finance")
    assert [m.task_id for m in wh] == [task_id(wal.wal_id, n, "warehouse") for n in (0, 1)]
    assert wh[0].args == [{"purchase_id": "p-1"}] and fi[0].name == "tasks.finance.record_revenue"
    rig.ack(wh + fi)
    rig.steps(2)
    assert wal.low_water_mark() == 2
