"""The example's Celery app with a relay on a test's own log (options chosen by the test:
segment size, cap, a failing file layer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.app import create_app
from tasks.config import Settings
from walrelay import Relay, RelaySettings
from walstore import Options, SyncPolicy

SMALL = 1 << 20  # segment size: a 64 MiB default would be pre-zeroed by every test


def example_relay(wal_dir: Path | str, **options: Any) -> Relay:
    """A relay of a fresh example app on ``wal_dir``; ``options``: walstore.Options fields
    (default: no fsync, 1 MiB segments)."""
    opts = Options(**{"sync": SyncPolicy.NONE, "segment_bytes": SMALL, **options})
    settings = RelaySettings(wal_dir=str(wal_dir))
    app = create_app(Settings(relay=settings))
    return Relay(app, str(wal_dir), settings=settings, wal_options=opts)
