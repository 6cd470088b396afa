"""After ``walstore repair`` accepted a lost end of the log, new records take the lost
records' LSNs, so their tasks get the same ids. The broker may still hold the lost
records' messages: workers run them (they were committed) and ack them. Those acks name
a copy published before the loss and must not confirm the new records that now have
those LSNs (their tasks would never run); acks of the new records' own copies do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.pumprig import Rig
from walrelay.broker import Ack
from walstore import Options, SyncPolicy, Wal

pytestmark = pytest.mark.timeout(60)
SMALL = Options(segment_bytes=8192, sync=SyncPolicy.NONE, min_free_bytes=0)


def _repair(wal_dir: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "walstore.cli", "repair", str(wal_dir)],
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 0 and "LOST" in done.stdout, done.stdout + done.stderr


def _lsn(task_id: str) -> int:
    return int(task_id.split("-")[1])


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
    newest = sorted(wal_dir.glob("*.seg"))[-1]
    lost_from = int(newest.stem)
    newest.unlink()
    _repair(wal_dir)

    wal = Wal.open(wal_dir, SMALL)
    try:
        assert wal.lost_tails() == [lost_from]
        rig = Rig(wal, tmp_path)  # a new pump (and the same broker's worth of old copies)
        new = rig.append(5)
        assert new[0] == lost_from  # the lost LSNs are handed out again
        rig.steps(3)
        published = rig.take("warehouse") + rig.take("finance")
        fresh = [m for m in published if _lsn(m.task_id) in new]
        assert len(fresh) == 10
        stale = [m for m in before if _lsn(m.task_id) in new]
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
    newest = sorted(wal_dir.glob("*.seg"))[-1]
    lost_from = int(newest.stem)
    newest.unlink()
    _repair(wal_dir)

    wal = Wal.open(wal_dir, SMALL)
    try:
        rig = Rig(wal, tmp_path)
        rig.steps(3)
        kept = [m for m in before if _lsn(m.task_id) < lost_from]
        assert kept
        rig.ack(kept)
        rig.steps(3)
        assert rig.pump.stats.acked == len(kept)
        assert wal.low_water_mark() >= lost_from
    finally:
        wal.close()


@pytest.mark.parametrize("copy", ["²:ab12.1", "x:y.z", ":.", "9" * 40 + ":ab.1", "ab12.²"])
def test_odd_copy_names_neither_crash_the_pump_nor_confirm_lost_lsns(
    tmp_path: Path, copy: str
) -> None:
    """A copy name the pump did not write counts as one from before every loss."""
    wal_dir = tmp_path / "wal"
    wal = Wal.open(wal_dir, SMALL)
    Rig(wal, tmp_path).append(60)
    wal.close()
    sorted(wal_dir.glob("*.seg"))[-1].unlink()
    _repair(wal_dir)
    wal = Wal.open(wal_dir, SMALL)
    try:
        rig = Rig(wal, tmp_path)
        [lsn] = rig.append(1)
        rig.steps(3)
        published = [m for m in rig.take("warehouse") if _lsn(m.task_id) == lsn]
        assert len(published) == 1
        rig.broker.send_ack(Ack(wal.wal_id, lsn, "warehouse", ok=True, copy=copy))
        rig.steps(3)
        assert rig.pump.stats.acked == 0
        assert rig.pump.stats.stale_acks == 1
    finally:
        wal.close()
