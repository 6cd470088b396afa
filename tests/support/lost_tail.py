"""What the lost-tail tests share: a relay on a log with small segments (so a few dozen
sends make several), keys on, and ``walstore repair`` run as an operator runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.walrelay.shop_app import app as shop
from walrelay import Relay, RelaySettings
from walstore import Options, SyncPolicy

SMALL = Options(sync=SyncPolicy.NONE, segment_bytes=8192, min_free_bytes=0)


def make(wal_dir: Path) -> Relay:
    settings = RelaySettings(wal_dir=str(wal_dir), idempotency_window=3600.0)
    return Relay(shop, str(wal_dir), settings=settings, wal_options=SMALL)


def run_repair(wal_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "walstore.cli", "repair", str(wal_dir)],
                          capture_output=True, text=True, timeout=30)  # fmt: skip
