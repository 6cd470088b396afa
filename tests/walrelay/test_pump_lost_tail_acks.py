"""After ``walstore repair`` accepted a lost end of the log, new records take the lost
records' LSNs, so their tasks get the same ids. The broker may still hold the lost
records' messages: workers run them (they were committed) and ack them. Those acks name
a copy published before the loss and must not confirm the new records that now have
those LSNs (their tasks would never run); acks of the new records' own copies do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.lost_tail import SMALL_PUMP, lose_newest, repair_accepting_loss, task_lsn
from tests.support.pumprig import Rig
from walrelay.broker import Ack
from walstore import Wal

pytestmark = pytest.mark.timeout(60)
SMALL = SMALL_PUMP


def test_acks_of_lost_records_do_not_confirm_the_records_that_took_their_lsns(
    tmp_path: Path,
) -> None:
    wal_dir = tmp_path / "wal"
    wal = Wal.open(wal_dir, SMALL)
    rig = Rig(wal, tmp_path)
    rig.append(60)  # several 8 KiB segments
    rig.steps(3)
    before = rig.take("warehouse") + rig.take("finance")  # published, never acked
    wal.close()
    lost_from = lose_newest(wal_dir)

    wal = Wal.open(wal_dir, SMALL)
    try:
        assert wal.lost_tails() == [lost_from]
        rig = Rig(wal, tmp_path)  # a new pump (and the same broker's worth of old copies)
        new = rig.append(5)
        assert new[0] == lost_from  # the lost LSNs are handed out again
        rig.steps(3)
        published = rig.take("warehouse") + rig.take("finance")
        fresh = [m for m in published if task_lsn(m.task_id) in new]
        assert len(fresh) == 10
        stale = [m for m in before if task_lsn(m.task_id) in new]
        assert {m.task_id for m in stale} == {m.task_id for m in fresh}  # same ids
        rig.ack(stale)  # a worker ran the lost records' messages
        rig.steps(3)
        assert rig.pump.stats.acked == 0  # nothing of the new records confirmed
        assert rig.pump.stats.stale_acks == len(stale)
        assert set(new) <= set(rig.pump.inflight)
        rig.ack(published)
        rig.steps(3)
        assert rig.pump.stats.acked == len(published)
        assert not rig.pump.inflight
        assert wal.low_water_mark() == new[-1] + 1
    finally:
        wal.close()


def test_acks_of_records_below_the_loss_still_confirm_them(tmp_path: Path) -> None:
    """A record that survived the loss (below it) published by the pump before the repair
    is confirmed by the ack of that earlier copy."""
    wal_dir = tmp_path / "wal"
    wal = Wal.open(wal_dir, SMALL)
    rig = Rig(wal, tmp_path)
    rig.append(60)
    rig.steps(3)
    before = rig.take("warehouse") + rig.take("finance")
    wal.close()
    lost_from = lose_newest(wal_dir)

    wal = Wal.open(wal_dir, SMALL)
    try:
        rig = Rig(wal, tmp_path)
        rig.steps(3)
        kept = [m for m in before if task_lsn(m.task_id) < lost_from]
        assert kept
        rig.ack(kept)
        rig.steps(3)
        assert rig.pump.stats.acked == len(kept)
        assert wal.low_water_mark() >= lost_from
    finally:
        wal.close()


@pytest.mark.parametrize(
    ("copy", "stale"),
    [("ab12.1.0123456789ab", True), ("x.y.z", True), ("a.\u00b2.b", True),
     ("9" * 40 + ".1.ff", True), ("ab12.1", False), ("\u00b2:ab12.1", False),
     ("ab12.1.", False), ("", False)],
)  # fmt: skip
def test_odd_copy_names_do_not_crash_the_pump(tmp_path: Path, copy: str, stale: bool) -> None:
    """A copy name whose last part is not this record's counts as another record's; one
    without that part (a pump or a worker of an older release) as this record's."""
    wal_dir = tmp_path / "wal"
    wal = Wal.open(wal_dir, SMALL)
    Rig(wal, tmp_path).append(60)
    wal.close()
    sorted(wal_dir.glob("*.seg"))[-1].unlink()
    repair_accepting_loss(wal_dir)
    wal = Wal.open(wal_dir, SMALL)
    try:
        rig = Rig(wal, tmp_path)
        [lsn] = rig.append(1)
        rig.steps(3)
        published = [m for m in rig.take("warehouse") if task_lsn(m.task_id) == lsn]
        assert len(published) == 1
        rig.broker.send_ack(Ack(wal.wal_id, lsn, "warehouse", ok=True, copy=copy or None))
        rig.steps(3)
        assert (rig.pump.stats.stale_acks, rig.pump.stats.acked) == ((1, 0) if stale else (0, 1))
    finally:
        wal.close()


# From the review of 2026-11-30: repeated losses, a damaged or removed LOSSES, a backlog.


def test_second_loss_at_the_same_lsn_still_makes_earlier_copies_stale(tmp_path: Path) -> None:
    wal_dir = tmp_path / "wal"
    wal = Wal.open(wal_dir, SMALL)
    Rig(wal, tmp_path).append(60)  # several 8 KiB segments
    wal.close()
    first_loss = lose_newest(wal_dir)  # loss 1

    wal = Wal.open(wal_dir, SMALL)
    rig = Rig(wal, tmp_path)  # pump P2 (after loss 1)
    second = rig.append(5, prefix="second")  # take the lost LSNs: a new segment
    assert second[0] == first_loss
    rig.steps(3)
    p2_copies = rig.take("warehouse") + rig.take("finance")  # published, never acked
    assert {task_lsn(m.task_id) for m in p2_copies} >= set(second)
    wal.close()
    again = lose_newest(wal_dir)  # loss 2: P2's records are gone too
    assert again == first_loss

    wal = Wal.open(wal_dir, SMALL)
    try:
        rig = Rig(wal, tmp_path)  # pump P3 (after loss 2)
        third = rig.append(5, prefix="third")  # the same LSNs, the same task ids, again
        assert third == second
        rig.steps(3)
        fresh = [m for m in rig.take("warehouse") + rig.take("finance")
                 if task_lsn(m.task_id) in third]  # fmt: skip
        stale = [m for m in p2_copies if task_lsn(m.task_id) in third]
        assert {m.task_id for m in stale} == {m.task_id for m in fresh}
        rig.ack(stale)  # workers ran P2's copies of the records lost in loss 2
        rig.steps(3)
        # Expected: ignored as stale; the third records' tasks have not run.
        assert rig.pump.stats.stale_acks == len(stale), (wal.lost_tails(), rig.pump.stats)
        assert rig.pump.stats.acked == 0
        assert set(third) <= set(rig.pump.inflight)
    finally:
        wal.close()


def test_losses_damaged_with_a_loss_still_makes_earlier_copies_stale(tmp_path: Path) -> None:
    """LOSSES unreadable is rewritten by repair from the first LSN on disk; when the end
    of the log is lost in the same incident, the copies of the pump before it must
    still be stale."""
    wal_dir = tmp_path / "wal"
    wal = Wal.open(wal_dir, SMALL)
    Rig(wal, tmp_path).append(60)
    wal.close()
    lose_newest(wal_dir)  # loss 1
    wal = Wal.open(wal_dir, SMALL)
    Rig(wal, tmp_path).append(60, prefix="b")
    wal.close()
    lose_newest(wal_dir)  # loss 2 (a later LSN)
    wal = Wal.open(wal_dir, SMALL)
    assert len(wal.lost_tails()) == 2
    rig = Rig(wal, tmp_path)  # pump P3: copies named "2:..."
    new = rig.append(40, prefix="c")
    rig.steps(3)
    p3_copies = rig.take("warehouse") + rig.take("finance")
    assert {task_lsn(m.task_id) for m in p3_copies} >= set(new)
    wal.close()
    (wal_dir / "LOSSES").write_bytes(b"\x00garbage")  # the same incident damaged LOSSES
    lost_from = lose_newest(wal_dir)  # loss 3

    wal = Wal.open(wal_dir, SMALL)
    try:
        rig = Rig(wal, tmp_path)  # pump P4
        fourth = rig.append(5, prefix="d")
        assert fourth[0] == lost_from
        rig.steps(3)
        stale = [m for m in p3_copies if task_lsn(m.task_id) in fourth]
        assert stale
        rig.ack(stale)  # workers ran P3's copies of records lost in loss 3
        rig.steps(3)
        assert rig.pump.stats.stale_acks == len(stale), (wal.lost_tails(), rig.pump.stats)
        assert rig.pump.stats.acked == 0
    finally:
        wal.close()


CONFIG: dict[str, Any] = {"stall_timeout": 300.0, "max_ack_timeout": 60.0, "ack_timeout": 30.0}


def test_a_backlog_of_stale_copies_is_not_a_stalled_queue(tmp_path: Path) -> None:
    wal_dir = tmp_path / "wal"
    wal = Wal.open(wal_dir, SMALL)
    rig = Rig(wal, tmp_path, **CONFIG)
    rig.append(200)  # the newest segment holds a few dozen records
    rig.steps(3)
    backlog = rig.take("warehouse")  # P1's copies, still queued at the broker
    wal.close()
    lost = sorted(wal_dir.glob("*.seg"))[-5:]  # the newest segments, lost together
    for seg in lost:
        seg.unlink()
    done = subprocess.run([sys.executable, "-m", "walstore.cli", "repair", str(wal_dir)],
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert "LOST" in done.stdout
    lost_from = int(lost[0].stem)

    wal = Wal.open(wal_dir, SMALL)
    try:
        rig = Rig(wal, tmp_path, **CONFIG)
        new = rig.append(3, prefix="new")
        rig.steps(3)
        queue = [m for m in backlog if int(m.task_id.split("-")[1]) >= lost_from]
        stale_count = len(queue)
        assert stale_count * 10 > CONFIG["stall_timeout"]  # > 300 s of work at 10 s a task
        rig.ack(rig.take("finance"))  # finance is not what this test is about
        queue += rig.take("warehouse")  # behind them: P2's copies (FIFO)
        # Below the loss P1 and P2 both sent copies: a worker confirms those first.
        below = [m for m in queue if int(m.task_id.split("-")[1]) < lost_from]
        queue = [m for m in queue if int(m.task_id.split("-")[1]) >= lost_from]
        rig.ack(below)
        rig.steps(2)
        # One worker, FIFO, one task every 10 s, every one succeeds; 30 min at most.
        for _ in range(180):
            if not queue:
                break
            rig.ack([queue.pop(0)])
            queue += rig.take("warehouse")  # re-sends/probes join the end of the queue
            rig.ack(rig.take("finance"))
            rig.run_for(10, every=1)
        # Stale copies at reused LSNs are ignored; the rest match no record (duplicates).
        assert rig.pump.stats.stale_acks + rig.pump.stats.duplicate_acks >= stale_count
        # Expected: the new records confirmed, none dead-lettered.
        assert rig.pump.stats.stalled == 0, rig.pump.stats
        assert rig.pump.stats.dead_lettered == 0
        assert not set(new) & set(rig.pump.inflight)
    finally:
        wal.close()


def test_losses_removed_after_a_repair_still_makes_earlier_copies_stale(tmp_path: Path) -> None:
    """The acks are told apart by the record they ran, not by what LOSSES says."""
    wal_dir = tmp_path / "wal"
    wal = Wal.open(wal_dir, SMALL)
    rig = Rig(wal, tmp_path)
    rig.append(60)
    rig.steps(3)
    before = rig.take("warehouse")
    wal.close()
    lose_newest(wal_dir)
    (wal_dir / "LOSSES").unlink()
    wal = Wal.open(wal_dir, SMALL)
    try:
        assert wal.lost_tails() == []
        rig = Rig(wal, tmp_path)
        new = rig.append(5)
        rig.steps(3)
        stale = [m for m in before if task_lsn(m.task_id) in new]
        assert stale
        rig.ack(stale)
        rig.steps(3)
        assert rig.pump.stats.stale_acks == len(stale)
        assert rig.pump.stats.acked == 0
    finally:
        wal.close()
