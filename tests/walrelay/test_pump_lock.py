"""Exactly one pump per WAL directory: the lock names the pump that holds it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from walrelay.commands.pump import acquire_pump_lock
from walrelay.errors import PumpLockedError

pytestmark = pytest.mark.timeout(10)


def test_a_second_pump_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    wal_dir = tmp_path / "wal"
    fd = acquire_pump_lock(str(wal_dir))
    try:
        with pytest.raises(PumpLockedError) as err:
            acquire_pump_lock(str(wal_dir))  # another open file description: refused
        assert str(err.value) == f"another pump (pid {os.getpid()}) is running for {wal_dir}"
    finally:
        os.close(fd)
    os.close(acquire_pump_lock(str(wal_dir)))  # released with its holder
