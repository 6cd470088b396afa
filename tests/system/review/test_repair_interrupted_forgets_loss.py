"""Attack: `walstore repair` of a lost end of the log stops before it has written LOSSES
(it is killed there, or LOSSES is unreadable), then is run again.

README / docs/walstore-damage.md, row "the newest segment(s) missing": repair "accepts the
loss ... prints `LOST: LSN m and after` ... records `m` in `LOSSES`, from which walrelay's
key index drops its rows, so a key whose record was lost is sent anew"; walstore/format.py:
LOSSES lists "where ``walstore repair`` accepted a lost end of the log"; README:
``Wal.lost_tails`` returns those LSNs.

Observed: repair rewrites the segments and points HEAD at the newest segment on disk
*before* it writes LOSSES (walstore/repair.py ``_repair``: ``_repair_head`` then
``_record_loss``). When it stops in between (SIGKILL; or LOSSES unreadable, where it exits
2 having already moved HEAD) the log opens as if whole, and the next repair says "nothing
to repair": `m` is never recorded, ``lost_tails()`` is ``[]``, and the key index keeps the
rows of the lost records.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.walrelay.shop_app import app as shop
from tests.walrelay.shop_tasks import reserve
from walrelay import Relay, RelaySettings
from walstore import Options, SyncPolicy, Wal
from walstore.fs import OsFs
from walstore.repair import repair

pytestmark = pytest.mark.timeout(60)
SMALL = Options(sync=SyncPolicy.NONE, segment_bytes=8192, min_free_bytes=0)


class Killed(BaseException):
    """The repair process died here (as by SIGKILL: no clean-up runs)."""


class DiesBeforeLosses(OsFs):
    def write_file_atomic(self, directory: str, name: str, data: bytes) -> None:
        if name == "LOSSES":
            raise Killed
        super().write_file_atomic(directory, name, data)


def lose_the_newest_segment(wal_dir: Path) -> int:
    """Fill a few segments with keyed sends, delete the newest; returns HEAD."""
    settings = RelaySettings(wal_dir=str(wal_dir), idempotency_window=3600.0)
    relay = Relay(shop, str(wal_dir), settings=settings, wal_options=SMALL)
    for i in range(100):
        relay.send(reserve.s(f"order-{i}"), key=f"order-{i}")
    relay.close()
    newest = sorted(wal_dir.glob("*.seg"))[-1]
    newest.unlink()
    return int(newest.stem)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "walstore.cli", *args],
                          capture_output=True, text=True, timeout=30)  # fmt: skip


def test_repair_killed_before_losses_then_run_again_records_the_loss(tmp_path: Path) -> None:
    wal_dir = tmp_path / "wal"
    head = lose_the_newest_segment(wal_dir)
    with pytest.raises(Killed):
        repair(str(wal_dir), fs=DiesBeforeLosses())
    again = cli("repair", str(wal_dir))
    with Wal.open(wal_dir, SMALL) as wal:
        tails = wal.lost_tails()
    assert again.returncode == 0
    assert tails == [head] and f"LOST: LSN {head} and after" in again.stdout, (
        f"segment {head} (HEAD) was lost; the first repair died before writing LOSSES; "
        f"the second said {again.stdout.strip()!r}; lost_tails() = {tails}"
    )


def test_an_unreadable_losses_is_refused_then_repair_starts_it_again(tmp_path: Path) -> None:
    """LOSSES damaged: every reader refuses naming it (a key index reading it would not
    know what to forget); repair sets it aside, starts it again from the first LSN on
    disk (the index then re-reads every row from there), and records the new loss."""
    wal_dir = tmp_path / "wal"
    head = lose_the_newest_segment(wal_dir)
    losses = wal_dir / "LOSSES"
    losses.write_bytes(b"\xff not json")
    losses.chmod(0o600)
    assert cli("status", str(wal_dir)).returncode == 2  # (naming the missing segment first)
    first = min(int(p.stem) for p in wal_dir.glob("*.seg"))
    again = cli("repair", str(wal_dir))
    assert again.returncode == 0 and "LOSSES" in again.stdout, again.stdout + again.stderr
    with Wal.open(wal_dir, SMALL) as wal:
        tails = wal.lost_tails()
    assert tails == [first, head] and f"LOST: LSN {head} and after" in again.stdout, (
        f"repair said {again.stdout.strip()!r}; lost_tails() = {tails}"
    )
    assert cli("repair", str(wal_dir)).stdout.strip() == "nothing to repair"
