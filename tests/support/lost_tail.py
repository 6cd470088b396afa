"""What the lost-tail tests share: a relay on a log with small segments (so a few dozen
sends make several), keys on, and ``walstore repair`` run as an operator runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.walrelay.shop_app import app as shop
from walrelay import Relay, RelaySettings
from walrelay.record import decode
from walstore import Options, SyncPolicy, Wal

SMALL = Options(sync=SyncPolicy.NONE, segment_bytes=8192, min_free_bytes=0)


def make(wal_dir: Path) -> Relay:
    settings = RelaySettings(wal_dir=str(wal_dir), idempotency_window=3600.0)
    return Relay(shop, str(wal_dir), settings=settings, wal_options=SMALL)


def run_repair(wal_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "walstore.cli", "repair", str(wal_dir)],
                          capture_output=True, text=True, timeout=30)  # fmt: skip


# For the pump's lost-tail tests (tests/walrelay/test_pump_*): a log of small segments,
# its newest segment lost and repaired as an operator would.
SMALL_PUMP = Options(segment_bytes=8192, sync=SyncPolicy.NONE, min_free_bytes=0)


def repair_accepting_loss(wal_dir: Path) -> None:
    done = run_repair(wal_dir)
    assert done.returncode == 0 and "LOST" in done.stdout, done.stdout + done.stderr


def lose_newest(wal_dir: Path) -> int:
    """Delete the newest segment of the (closed) log and repair it; returns its first LSN,
    the first one handed out again."""
    newest = sorted(wal_dir.glob("*.seg"))[-1]
    newest.unlink()
    repair_accepting_loss(wal_dir)
    return int(newest.stem)


def task_lsn(task_id: str) -> int:
    return int(task_id.split("-")[1])


def keyed_lsns(wal: Wal, key: str) -> list[int]:
    """The LSNs of the records of ``key`` still in the log."""
    return [lsn for lsn, p in wal.iter_from(wal.first_lsn()) if decode(p).key == key]
