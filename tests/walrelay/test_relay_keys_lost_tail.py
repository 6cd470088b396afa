"""A key whose record was lost with the end of the log (newest segment deleted, then
``walstore repair`` accepted the loss) is sent again on retry, not answered with the
receipt of a record that no longer exists; a key whose record is still there (or was
pruned, confirmed) keeps its first answer."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.lost_tail import keyed_lsns, make, run_repair
from tests.walrelay.shop_tasks import reserve
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
