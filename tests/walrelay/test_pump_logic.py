"""The pump's logic against the in-memory publisher and a real (temporary) log, with a
fake clock: windowing, acks out of order, redelivery, dead letters, the watermark."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.pumprig import Rig
from walrelay.broker import Ack
from walrelay.record import Entry, TaskSpec, decode, task_id
from walstore import Wal

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def rig(wal: Wal, tmp_path: Path) -> Rig:
    return Rig(wal, tmp_path)


def test_each_entry_becomes_one_task_per_target_with_derived_ids(rig: Rig) -> None:
    lsns = rig.append(3)
    rig.steps(1)
    warehouse, finance = rig.take("warehouse"), rig.take("finance")
    assert [m.task_id for m in warehouse] == [task_id(rig.wal.wal_id, n, "warehouse") for n in lsns]
    assert [m.task_id for m in finance] == [task_id(rig.wal.wal_id, n, "finance") for n in lsns]
    assert warehouse[0].name == "tasks.warehouse.reserve_stock"
    assert warehouse[0].args[0]["purchase_id"] == "p0"
    assert rig.pump.stats.published == 6


def test_window_bounds_what_is_in_flight(wal: Wal, tmp_path: Path) -> None:
    rig = Rig(wal, tmp_path, window=10, read_batch=4)
    rig.append(25)
    rig.steps(10)
    assert len(rig.pump.inflight) == 10
    assert rig.broker.published == 20  # nothing more until something is confirmed
    first = rig.take("warehouse")[:3] + rig.take("finance")[:3]
    rig.ack(first)
    rig.steps(3)
    assert len(rig.pump.inflight) == 10
    assert rig.broker.published == 26
    assert rig.pump.refresh_stats().backlog == 22


def test_acks_out_of_order_hold_the_watermark_until_contiguous(rig: Rig) -> None:
    rig.append(6)
    rig.steps(1)
    wh, fi = rig.take("warehouse"), rig.take("finance")
    rig.ack(wh[3:] + fi[3:])  # entries 3..5 done first
    rig.steps(2)
    assert rig.wal.low_water_mark() == 0
    assert sorted(rig.pump.inflight) == [0, 1, 2]
    rig.ack(wh[:3] + fi[1:3])  # entry 0 still misses finance
    rig.steps(2)
    assert rig.wal.low_water_mark() == 0
    rig.ack(fi[:1])
    rig.steps(2)
    assert rig.wal.low_water_mark() == 6
    assert not rig.pump.inflight


def test_watermark_is_persisted_and_sealed_segments_pruned(rig: Rig) -> None:
    rig.append(120)  # ~330 bytes each in 8 KiB segments: several segments
    assert rig.wal.status().segments > 3
    for _ in range(20):
        rig.steps(1)
        rig.ack_everything()
    rig.steps(2)
    status = rig.wal.status()
    assert status.low_water_mark == status.next_lsn == 120
    assert status.segments == 1
    assert rig.pump.stats.pruned_segments > 2


def test_task_failures_retry_with_backoff_then_dead_letter(wal: Wal, tmp_path: Path) -> None:
    rig = Rig(wal, tmp_path, retry_delay=1.0, max_attempts=3)
    rig.append(2)
    rig.steps(1)
    rig.ack(rig.take("finance"))
    wh = rig.take("warehouse")
    rig.ack(wh[1:])
    for attempt, delay in enumerate([1.0, 2.0], start=1):
        rig.ack(rig.take("warehouse") or wh[:1], ok=False, error="boom")
        rig.steps(1)
        assert rig.pump.inflight[0].targets["warehouse"].attempts == attempt
        rig.clock.advance(delay - 0.01)
        rig.steps(1)
        assert rig.take("warehouse") == []  # not before the backoff
        rig.clock.advance(0.02)
        rig.steps(1)
        wh = rig.take("warehouse")
        assert [m.task_id for m in wh] == [task_id(wal.wal_id, 0, "warehouse")]
    rig.ack(wh, ok=False, error="boom")
    rig.steps(2)
    letters = rig.deadletters.list()
    assert [(d.lsn, d.key, list(d.targets)) for d in letters] == [(0, "p0", ["warehouse"])]
    assert letters[0].targets["warehouse"] == {"attempts": 3, "error": "boom"}
    assert [t.target for t in decode(letters[0].payload).tasks] == ["warehouse"]
    assert wal.low_water_mark() == 2  # the dead entry no longer holds the watermark
    assert rig.pump.stats.dead_lettered == 1 and rig.pump.stats.failed == 3


def test_a_quiet_queue_is_not_a_lost_message(wal: Wal, tmp_path: Path) -> None:
    rig = Rig(wal, tmp_path, ack_timeout=5.0, max_ack_timeout=60.0, max_attempts=2)
    rig.append(1)
    rig.steps(1)
    rig.take("warehouse"), rig.take("finance")
    for _ in range(5):  # workers busy or down: no evidence of loss, nothing re-sent
        rig.clock.advance(5.0)
        rig.steps(1)
    assert rig.broker.published == 2 and rig.pump.stats.lost == 0
    rig.clock.advance(35.0)  # past max_ack_timeout: re-sent, not counted as an attempt
    rig.steps(1)
    assert len(rig.take("warehouse")) == 1 and len(rig.take("finance")) == 1
    assert rig.pump.inflight[0].targets["warehouse"].attempts == 0
    assert rig.pump.stats.redelivered == 2


def test_a_task_passed_by_later_ones_is_resent_and_counted(wal: Wal, tmp_path: Path) -> None:
    rig = Rig(wal, tmp_path, ack_timeout=5.0, max_attempts=2)
    rig.append(3)
    rig.steps(1)
    wh, fi = rig.take("warehouse"), rig.take("finance")
    rig.ack(wh[1:] + fi)  # warehouse of entry 0 vanished; later ones were processed
    rig.steps(1)
    rig.clock.advance(5.1)
    rig.steps(1)
    assert rig.take("warehouse") == []  # passed by later ones: one more timeout to finish
    rig.clock.advance(5.1)
    rig.steps(1)
    assert [m.task_id for m in rig.take("warehouse")] == [task_id(wal.wal_id, 0, "warehouse")]
    assert rig.pump.stats.lost == 1
    rig.append(1)  # a later task completes again: the re-sent one is lost a second time
    rig.steps(1)
    rig.ack_everything()
    rig.steps(1)
    rig.clock.advance(5.1)
    rig.steps(2)
    rig.clock.advance(5.1)
    rig.steps(2)
    assert [d.lsn for d in rig.deadletters.list()] == [0]
    assert wal.low_water_mark() == 4


def test_broker_restart_resends_everything_in_flight_at_once(rig: Rig) -> None:
    rig.append(5)
    rig.steps(1)
    rig.ack(rig.take("warehouse")[:2] + rig.take("finance")[:1])
    rig.steps(1)
    rig.broker.restart()  # queues and acks gone, new session
    rig.steps(1)
    resent = sorted(m.task_id for m in rig.take("warehouse") + rig.take("finance"))
    expected = [task_id(rig.wal.wal_id, n, "finance") for n in range(1, 5)]
    expected += [task_id(rig.wal.wal_id, n, "warehouse") for n in range(2, 5)]
    assert resent == sorted(expected)
    assert rig.pump.stats.redelivered == 7 and rig.pump.stats.broker_sessions == 2


def test_broker_down_then_back_resends_what_may_have_been_lost(rig: Rig) -> None:
    rig.steps(1)
    rig.broker.down = True
    rig.append(3)
    rig.steps(3)

    # Read through a function: mypy would narrow the attribute after the first assert.
    def down() -> bool:
        return rig.pump.stats.broker_down

    assert down()
    assert rig.broker.published == 0
    rig.broker.down = False
    rig.steps(2)
    assert not down()
    sent = rig.take("warehouse") + rig.take("finance")
    assert len(sent) == 6
    rig.ack(sent)
    rig.steps(2)
    assert rig.wal.low_water_mark() == 3


def test_undecodable_entries_go_straight_to_the_dead_letters(rig: Rig) -> None:
    rig.wal.append(b"\xff not json")
    rig.wal.append(Entry("k", (TaskSpec("t", "x.y", "q"), TaskSpec("t", "x.z", "q"))).encode())
    rig.append(1)
    rig.steps(1)
    letters = rig.deadletters.list()
    assert [d.lsn for d in letters] == [0, 1]
    assert "undecodable" in letters[0].reason and letters[0].payload == b"\xff not json"
    rig.ack_everything()
    rig.steps(2)
    assert rig.wal.low_water_mark() == 3


def test_duplicate_and_foreign_acks_change_nothing(rig: Rig) -> None:
    rig.append(2)
    rig.steps(1)
    wh = rig.take("warehouse")
    rig.ack(wh + wh)
    rig.broker.acks.append(Ack("f" * 32, 1, "finance", True))
    rig.broker.acks.append(Ack(rig.wal.wal_id, 99, "finance", True))
    rig.steps(1)
    assert rig.pump.stats.acked == 2
    assert rig.pump.stats.duplicate_acks == 4
    assert sorted(rig.pump.inflight) == [0, 1]


def test_a_new_pump_resumes_from_the_low_water_mark(rig: Rig) -> None:
    rig.append(4)
    rig.steps(1)
    rig.ack(rig.take("warehouse")[:2] + rig.take("finance")[:2])
    rig.steps(2)
    assert rig.wal.low_water_mark() == 2
    rig.pump.checkpoint(force=True)
    again = rig.new_pump()
    again.step()
    assert [m.task_id for m in rig.take("warehouse")] == [
        task_id(rig.wal.wal_id, n, "warehouse") for n in (2, 3)
    ]


def test_timers_of_acked_tasks_do_not_pile_up(wal: Wal, tmp_path: Path) -> None:
    rig = Rig(wal, tmp_path, window=50, read_batch=50, ack_timeout=1000.0)
    for _ in range(100):
        rig.append(50)
        rig.steps(1)
        rig.ack_everything()
        rig.steps(1)
    assert rig.pump.stats.acked == 10_000
    assert len(rig.pump.timers.heap) <= 4096 + 100  # 10,000 without sweeping


def test_stats_describe_the_window(rig: Rig) -> None:
    rig.append(3)
    rig.steps(1)
    rig.clock.advance(2.5)
    stats = rig.pump.refresh_stats()
    assert (stats.in_flight, stats.backlog, stats.low_water_mark, stats.high_water_mark) == (
        3, 3, 0, 3,
    )  # fmt: skip
    assert stats.oldest_unconfirmed_age == pytest.approx(2.5)
    assert set(stats.as_dict()) >= {"published", "acked", "redelivered", "dead_lettered",
                                    "in_flight", "backlog", "oldest_unconfirmed_age"}  # fmt: skip


def test_a_failed_checkpoint_is_retried_and_the_pump_keeps_going(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    from walstore import WalError

    real = rig.wal.set_low_water_mark
    failures = []

    def failing(lsn: int) -> int:
        failures.append(lsn)
        raise WalError("could not persist the low water mark (EIO)")

    monkeypatch.setattr(rig.wal, "set_low_water_mark", failing)
    rig.append(3)
    rig.steps(1)
    rig.ack(rig.take("warehouse") + rig.take("finance"))
    rig.steps(2)  # the checkpoint fails, the pump does not
    assert failures and rig.wal.low_water_mark() == 0
    monkeypatch.setattr(rig.wal, "set_low_water_mark", real)
    rig.append(1)
    rig.steps(2)
    assert rig.wal.low_water_mark() == 3  # retried; entry 3 still in flight


def test_a_backlog_of_duplicates_is_not_a_queue_nobody_consumes(wal: Wal, tmp_path: Path) -> None:
    """A restarted pump publishes its window again: the duplicates queue up behind the
    first copies. A worker working through them (no task of the window any more) shows the
    queue moving, so the records queued behind them are not dead-lettered as stalled."""
    config: dict[str, Any] = {"stall_timeout": 300.0, "max_ack_timeout": 60.0, "ack_timeout": 30.0}
    rig = Rig(wal, tmp_path, **config)
    rig.append(40)
    rig.steps(2)
    queue = rig.take("warehouse")
    rig.ack(rig.take("finance"))
    rig.pump = rig.new_pump()  # restarted: everything unconfirmed goes again
    rig.steps(2)
    queue += rig.take("warehouse")
    rig.ack(rig.take("finance"))
    new = rig.append(3, prefix="new")
    rig.steps(2)
    queue += rig.take("warehouse")
    rig.ack(rig.take("finance"))
    assert len(queue) * 10 > 2 * config["stall_timeout"]  # two timeouts' worth of work
    for _ in range(200):  # one worker, FIFO, a task every 10 s, every one succeeds
        if not queue:
            break
        rig.ack([queue.pop(0)])
        rig.run_for(10, every=1)
        queue += rig.take("warehouse")
        rig.ack(rig.take("finance"))
    assert rig.pump.stats.duplicate_acks >= 40
    assert rig.pump.stats.stalled == 0 and rig.pump.stats.dead_lettered == 0, rig.pump.stats
    assert not set(new) & set(rig.pump.inflight)
