"""Attack: a key whose record was lost with the end of the log, retried only after the
new records that took its LSN again were confirmed and pruned.

README, "On a damaged log", row "the newest segment(s) missing": repair "accepts the
loss: prints `LOST: LSN n and after` (... new records take those LSNs again, and an
idempotency key whose record was lost is sent anew, not answered from the index)".
Observed: a retry that comes after the pump pruned past the reused LSN is answered with
the receipt of the lost record (walrelay/keys.py ``_in_log`` takes any LSN below the
first one on disk for "pruned: its tasks were confirmed"), and nothing is appended: the
purchase is never delivered, although the caller was told it is committed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.lost_tail import keyed_lsns, make, run_repair
from tests.walrelay.shop_tasks import reserve

pytestmark = pytest.mark.timeout(60)


def test_a_lost_key_retried_after_its_lsn_was_reused_and_pruned_is_sent_again(
    tmp_path: Path,
) -> None:
    wal_dir = tmp_path / "wal"
    relay = make(wal_dir)
    for i in range(60):
        relay.send(reserve.s(f"filler-{i}"))
    lost = relay.send(reserve.s("lost"), key="lost")
    relay.close()
    newest = sorted(wal_dir.glob("*.seg"))[-1]
    assert int(newest.stem) <= lost.lsn
    newest.unlink()  # the record of key "lost" goes with it
    repair = run_repair(wal_dir)
    assert repair.returncode == 0 and "LOST" in repair.stdout, repair.stdout + repair.stderr

    relay = make(wal_dir)
    try:
        wal = relay.wal()
        while wal.next_lsn() <= lost.lsn + 40:  # new records take the lost LSNs again
            relay.send(reserve.s("other"))
        wal.set_low_water_mark(wal.next_lsn())  # the pump confirmed them: pruned
        assert wal.first_lsn() > lost.lsn
        before = wal.next_lsn()
        again = relay.send(reserve.s("lost"), key="lost")
        keyed = keyed_lsns(wal, "lost")
    finally:
        relay.close()
    assert keyed == [again.lsn] and again.lsn >= before, (
        f"key 'lost' (its record at LSN {lost.lsn} was lost and repair accepted it) was "
        f"answered with {again} and nothing appended (next LSN was {before}); its task "
        "will never run"
    )
