"""Attack: the pump confirmed and pruned everything but the active segment (the normal
state of a drained log), then that one segment is lost (deleted, or left out of a
restore).

README, "On a damaged log", row "the newest segment(s) missing": open refuses with
"missing: the log's newest segment started at LSN n (HEAD)" and `walstore repair`
accepts the loss from the first LSN not known to be used or confirmed. Only LSNs at and
above the low water mark were lost: the records below it were confirmed and pruned.
docs/api.md (key): a second send of a key with the same tasks "returns the first
receipt and appends nothing".

Observed: repair prints `LOST: LSN 0 and after`, deletes HEAD, and the log starts again
at LSN 0, so LSNs (and task ids ``<wal id>-<lsn>-<target>``) of records that were
confirmed are handed out again; a retried key whose record was confirmed and pruned is
appended (and delivered) a second time. Also, `Wal.open` names `CHECKPOINT` ("low water
mark 60 but no segment exists") where `walstore status` names the missing segment
(docs/walstore-damage.md: "Every reader gives the verdict `Wal.open` gives").
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.lost_tail import SMALL, make, run_repair
from tests.walrelay.shop_tasks import reserve
from walrelay import Relay
from walstore import CorruptLogError, Wal

pytestmark = pytest.mark.timeout(60)


def drained_then_lost(wal_dir: Path) -> tuple[Relay, int]:
    """A keyed record at LSN 0, fillers, all confirmed and pruned; then the one segment
    left (the newest) is deleted and `walstore repair` run. Returns (relay, HEAD)."""
    relay = make(wal_dir)
    for i in range(60):
        relay.send(reserve.s(f"filler-{i}"))
    wal = relay.wal()
    wal.set_low_water_mark(wal.next_lsn())  # the pump confirmed everything: pruned
    relay.close()
    (newest,) = wal_dir.glob("*.seg")
    head = int(newest.stem)
    assert head > 0
    newest.unlink()
    return relay, head


def repair(wal_dir: Path) -> str:
    result = run_repair(wal_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_open_names_the_missing_segment_as_status_does(tmp_path: Path) -> None:
    wal_dir = tmp_path / "wal"
    _, head = drained_then_lost(wal_dir)
    status = subprocess.run([sys.executable, "-m", "walstore.cli", "status", str(wal_dir)],
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    with pytest.raises(CorruptLogError) as info:
        Wal.open(wal_dir, SMALL)
    assert f"started at LSN {head}" in status.stderr, status.stderr
    assert f"started at LSN {head}" in str(info.value), (
        f"status says {status.stderr.strip()!r} but Wal.open says {info.value}"
    )


def test_repair_reports_the_lost_lsns_and_keeps_confirmed_ones(tmp_path: Path) -> None:
    wal_dir = tmp_path / "wal"
    _, head = drained_then_lost(wal_dir)
    out = repair(wal_dir)
    lost = re.search(r"LOST: LSN (\d+) and after", out)
    with Wal.open(wal_dir, SMALL) as wal:
        restart = wal.next_lsn()
        lwm = wal.low_water_mark()
    # Below the low water mark (60) every record was confirmed: from there on is lost,
    # and the log goes on from there, never below a confirmed LSN.
    assert lost is not None and int(lost.group(1)) == restart == lwm == 60 >= head, (
        f"HEAD said LSN {head}; repair said {out.strip()!r}; the log starts again at "
        f"LSN {restart} (low water mark {lwm}), reusing LSNs of records that were confirmed"
    )


def test_a_confirmed_and_pruned_key_is_not_sent_again(tmp_path: Path) -> None:
    wal_dir = tmp_path / "wal"
    relay = make(wal_dir)
    first = relay.send(reserve.s("order-1"), key="order-1")
    relay.close()
    relay, _ = drained_then_lost(wal_dir)
    repair(wal_dir)
    relay = make(wal_dir)
    try:
        before = relay.wal().next_lsn()
        again = relay.send(reserve.s("order-1"), key="order-1")
        after = relay.wal().next_lsn()
    finally:
        relay.close()
    assert (again, after) == (first, before), (
        f"key order-1 (LSN {first.lsn}, confirmed and pruned) sent again: receipt {again}, "
        f"next LSN {before} -> {after} (a record was appended and will be delivered again)"
    )
