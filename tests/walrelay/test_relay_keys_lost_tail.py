"""A key whose record was lost with the end of the log (newest segment deleted, then
``walstore repair`` accepted the loss) is sent again on retry, not answered with the
receipt of a record that no longer exists; a key whose record is still there (or was
pruned, confirmed) keeps its first answer."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.lost_tail import keyed_lsns, make, run_repair, task_lsn
from tests.walrelay.shop_tasks import reserve
from walrelay import Receipt
from walrelay.keys import index_for
from walrelay.record import decode

pytestmark = pytest.mark.timeout(60)


def test_a_key_lost_with_the_tail_is_sent_again_after_repair(tmp_path: Path) -> None:
    wal_dir = tmp_path / "wal"
    relay = make(wal_dir)
    kept = relay.send(reserve.s("kept"), key="kept")
    for i in range(60):
        relay.send(reserve.s(f"filler-{i}"))
    lost = relay.send(reserve.s("lost"), key="lost")
    relay.close()
    newest = sorted(wal_dir.glob("*.seg"))[-1]
    assert int(newest.stem) <= lost.lsn and int(newest.stem) > kept.lsn
    newest.unlink()
    repair = run_repair(wal_dir)
    assert repair.returncode == 0 and "LOST" in repair.stdout, repair.stdout + repair.stderr

    relay = make(wal_dir)
    try:
        again = relay.send(reserve.s("lost"), key="lost")
        found = {decode(p).key: lsn for lsn, p in relay.wal().iter_from(0)}
        assert found.get("lost") == again.lsn  # appended anew, and the receipt says where
        filler = relay.send(reserve.s("new"))  # takes a lost LSN: the row must not
        assert relay.send(reserve.s("lost"), key="lost") == again  # the new first answer
        assert relay.send(reserve.s("kept"), key="kept") == kept  # still in the log
        assert filler.lsn > again.lsn
    finally:
        relay.close()


def test_an_index_that_saw_more_losses_than_losses_now_names_still_opens(
    tmp_path: Path,
) -> None:
    """LOSSES started again shorter than what the index saw (an operator removed it, or
    repair rewrote a damaged one): the index opens and keys still answer."""
    wal_dir = tmp_path / "wal"
    relay = make(wal_dir)
    for i in range(60):
        relay.send(reserve.s(f"filler-{i}"))
    relay.close()
    sorted(wal_dir.glob("*.seg"))[-1].unlink()
    assert run_repair(wal_dir).returncode == 0
    relay = make(wal_dir)
    first = relay.send(reserve.s("k"), key="k")  # the index takes in LOSSES here
    relay.close()
    (wal_dir / "LOSSES").unlink()
    relay = make(wal_dir)
    try:
        assert relay.send(reserve.s("k"), key="k") == first
    finally:
        relay.close()


@pytest.mark.parametrize("rebuilt", [False, True], ids=["noted-by-the-pump", "index-rebuilt"])
def test_a_key_whose_carried_copy_was_lost_with_the_tail_is_sent_again(
    tmp_path: Path, rebuilt: bool
) -> None:
    """A keyed send with a long countdown: the pump carries its record forward and the
    original's segment is pruned; then the end of the log, holding the carried copy, is
    lost and repair accepts it. The task is gone from the log, so a retry of the key must
    append it again, as for any record lost with the tail. ``rebuilt``: the index was
    built anew from the log after the carry (as after a reboot), not told by the pump."""
    from tests.support.pumprig import Rig

    wal_dir = tmp_path / "wal"
    relay = make(wal_dir)
    first = relay.send(reserve.s("remind").set(countdown=3 * 86400), key="remind")
    for i in range(60):
        relay.send(reserve.s(f"filler-{i}"))
    wal = relay.wal()
    rig = Rig(wal, tmp_path, carry_after=100.0)
    rig.drain()  # the fillers are confirmed; the reminder is held for its countdown
    rig.run_for(150)  # carried forward to the end of the log; the original released
    assert rig.pump.stats.carried == 1
    rig.pump.checkpoint(force=True)
    carried = keyed_lsns(wal, "remind")
    assert wal.first_lsn() > first.lsn and carried and carried[0] > first.lsn
    relay.close()
    if rebuilt:
        for path in wal_dir.glob("keys.sqlite3*"):
            path.unlink()
        fresh = make(wal_dir)
        index_for(fresh.wal())  # a new index: every keyed record in the log, carried ones too
        fresh.close()
    newest = sorted(wal_dir.glob("*.seg"))[-1]
    assert int(newest.stem) <= carried[0]
    newest.unlink()  # the carried copy goes with it
    repair = run_repair(wal_dir)
    assert repair.returncode == 0 and "LOST" in repair.stdout, repair.stdout + repair.stderr

    relay = make(wal_dir)
    try:
        wal = relay.wal()
        before = wal.next_lsn()
        again = relay.send(reserve.s("remind").set(countdown=3 * 86400), key="remind")
        keyed = keyed_lsns(wal, "remind")
    finally:
        relay.close()
    assert keyed == [again.lsn] and again.lsn >= before, (
        f"key 'remind' (its carried copy at LSN {carried[0]} was lost) was answered with "
        f"{again} and nothing appended (next LSN was {before}): its task will never run"
    )


def retry_the_reminder(wal_dir: Path) -> tuple[Receipt, list[int]]:
    """Send the reminder again under its key: (the receipt, the LSNs of its records the
    next pump would deliver, at or above the low water mark)."""
    relay = make(wal_dir)
    try:
        wal = relay.wal()
        again = relay.send(reserve.s("remind").set(countdown=3 * 86400), key="remind")
        live = [lsn for lsn in keyed_lsns(wal, "remind") if lsn >= wal.low_water_mark()]
    finally:
        relay.close()
    return again, live


def _carry_then_lose_the_copy(tmp_path: Path, older_unconfirmed: bool) -> int:
    """A keyed reminder carried forward by a pump; the segment holding the carried copy
    lost and repaired while the original is still at or above the low water mark: the
    pump never checkpointed past it, or an older task holds the mark. Returns the
    original's LSN."""
    from tests.support.pumprig import Rig

    wal_dir = tmp_path / "wal"
    relay = make(wal_dir)
    if older_unconfirmed:
        relay.send(reserve.s("slow-one"))  # LSN 0: a worker still busy with it
    first = relay.send(reserve.s("remind").set(countdown=3 * 86400), key="remind")
    for i in range(60):
        relay.send(reserve.s(f"filler-{i}"))
    wal = relay.wal()
    # Without checkpoints: the pump's release of the original never reaches the disk.
    rig = Rig(wal, tmp_path, carry_after=100.0,
              checkpoint_interval=0.0 if older_unconfirmed else 1e9)  # fmt: skip
    rig.steps(3)
    queued = rig.take("warehouse")
    rig.ack([m for m in queued if not (older_unconfirmed and task_lsn(m.task_id) == 0)])
    rig.run_for(150)
    assert rig.pump.stats.carried == 1
    copies = keyed_lsns(wal, "remind")
    assert wal.low_water_mark() <= first.lsn < copies[-1]
    relay.close()
    newest = sorted(wal_dir.glob("*.seg"))[-1]
    assert first.lsn < int(newest.stem) <= copies[-1]
    newest.unlink()
    repair = run_repair(wal_dir)
    assert repair.returncode == 0 and "LOST" in repair.stdout, repair.stdout + repair.stderr
    return first.lsn


@pytest.mark.parametrize("older_unconfirmed", [False, True], ids=["no-checkpoint", "older-task"])
def test_a_key_whose_carried_copy_was_lost_but_whose_original_remains_answers_first(
    tmp_path: Path, older_unconfirmed: bool
) -> None:
    """The original is still above the low water mark, so the next pump replays it: the
    record was not lost, and a retry of the key returns the first receipt (review: it
    appended a second record, and the task ran twice)."""
    original = _carry_then_lose_the_copy(tmp_path, older_unconfirmed)
    again, live = retry_the_reminder(tmp_path / "wal")
    assert again.lsn == original and live == [original], (again, live)


def test_a_key_carried_twice_whose_earlier_copy_remains_answers_first(tmp_path: Path) -> None:
    """Carried twice; the end of the log holding the second copy lost, the first copy
    still above the low water mark (an older task holds it): the next pump replays the
    first copy, so a retry of the key appends nothing."""
    from tests.support.pumprig import Rig

    wal_dir = tmp_path / "wal"
    relay = make(wal_dir)
    first = relay.send(reserve.s("remind").set(countdown=3 * 86400), key="remind")
    relay.send(reserve.s("slow-one"))  # a worker still busy with it: holds the mark
    for i in range(60):
        relay.send(reserve.s(f"filler-{i}"))
    wal = relay.wal()
    rig = Rig(wal, tmp_path, carry_after=100.0, checkpoint_interval=0.0)

    def confirm_all_but_the_slow_one() -> None:
        rig.steps(3)
        rig.ack([m for m in rig.take("warehouse") if task_lsn(m.task_id) != first.lsn + 1])
        rig.steps(3)

    confirm_all_but_the_slow_one()
    rig.run_for(110)  # carried once
    for i in range(60):
        relay.send(reserve.s(f"more-{i}"))
    confirm_all_but_the_slow_one()
    rig.run_for(110)  # carried again, the first copy released
    assert rig.pump.stats.carried == 2
    copies = keyed_lsns(wal, "remind")
    assert copies[0] == first.lsn and len(copies) == 3
    assert first.lsn < wal.low_water_mark() <= copies[1]
    relay.close()
    newest = sorted(wal_dir.glob("*.seg"))[-1]
    assert copies[1] < int(newest.stem) <= copies[2]
    newest.unlink()
    repair = run_repair(wal_dir)
    assert repair.returncode == 0 and "LOST" in repair.stdout, repair.stdout + repair.stderr

    again, live = retry_the_reminder(wal_dir)
    assert again.lsn == first.lsn and live == [copies[1]], (again, live, copies)
