"""A key whose record was lost with the end of the log (newest segment deleted, then
``walstore repair`` accepted the loss) is sent again on retry, not answered with the
receipt of a record that no longer exists; a key whose record is still there (or was
pruned, confirmed) keeps its first answer."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.lost_tail import make, run_repair
from tests.walrelay.shop_tasks import reserve
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
