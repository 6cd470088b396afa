"""Attack: the two newest segments are lost; a keyed record sat in the older of the two
(below HEAD's segment), and the pump, running again after repair, passes the lost
placeholders and prunes them before the key is retried.

README / docs/walstore-damage.md, row "the newest segment(s) missing": repair turns the
LSNs known to have been used (up to HEAD's segment) into lost placeholders and "records
`m` in `LOSSES`, from which walrelay's key index drops its rows, so a key whose record
was lost is sent anew". docs/api.md (key): "a key whose record was lost is sent anew".

Observed: the key's row names an LSN below m (a placeholder), so the index keeps it; once
the pump has confirmed past the placeholders and pruned their segment, ``_in_log``
(walrelay/keys.py) takes the LSN below the first one on disk for "pruned: confirmed" and
the retry gets the lost record's receipt, nothing appended: its tasks never run.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.lost_tail import keyed_lsns, make, run_repair
from tests.walrelay.shop_tasks import reserve

pytestmark = pytest.mark.timeout(60)


def test_a_key_lost_in_a_segment_before_head_is_sent_again_after_pruning(
    tmp_path: Path,
) -> None:
    wal_dir = tmp_path / "wal"
    relay = make(wal_dir)
    wal = relay.wal()
    for i in range(60):
        relay.send(reserve.s(f"filler-{i}"))
    lost = relay.send(reserve.s("lost"), key="lost")
    segments_then = len(list(wal_dir.glob("*.seg")))
    while len(list(wal_dir.glob("*.seg"))) < segments_then + 1:  # bounded by sizes
        relay.send(reserve.s("after"))
    relay.close()
    segs = sorted(wal_dir.glob("*.seg"))
    older, newest = segs[-2], segs[-1]
    assert int(older.stem) <= lost.lsn < int(newest.stem)
    older.unlink()  # the record of key "lost" goes with it
    newest.unlink()
    out = run_repair(wal_dir)
    assert out.returncode == 0, out.stdout + out.stderr
    m = re.search(r"LOST: LSN (\d+) and after", out.stdout)
    assert m is not None and int(m.group(1)) > lost.lsn, out.stdout

    relay = make(wal_dir)
    try:
        wal = relay.wal()
        for _ in range(200):  # new records: the placeholders' segment is sealed
            if wal.first_lsn() > lost.lsn:
                break
            relay.send(reserve.s("other"))
            wal.set_low_water_mark(wal.next_lsn())  # the pump passes them: pruned
        assert wal.first_lsn() > lost.lsn
        before = wal.next_lsn()
        again = relay.send(reserve.s("lost"), key="lost")
        keyed = keyed_lsns(wal, "lost")
    finally:
        relay.close()
    assert keyed == [again.lsn] and again.lsn >= before, (
        f"key 'lost' (its record at LSN {lost.lsn} was lost with the segments before HEAD; "
        f"repair said {out.stdout.strip()!r}) was answered with {again} and nothing "
        f"appended (next LSN was {before}); its task will never run"
    )
