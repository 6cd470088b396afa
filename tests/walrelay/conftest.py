"""Fixtures the pump's unit tests share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from walstore import Options, SyncPolicy, Wal


@pytest.fixture
def wal(tmp_path: Path) -> Iterator[Wal]:
    """A log of 8 KiB segments (a few dozen records make several), no fsync."""
    log = Wal.open(tmp_path / "wal", Options(segment_bytes=8192, sync=SyncPolicy.NONE))
    try:
        yield log
    finally:
        log.close()
