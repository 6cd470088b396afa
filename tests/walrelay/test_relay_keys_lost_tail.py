"""A key whose record was lost with the end of the log (newest segment deleted, then
``walstore repair`` accepted the loss) is sent again on retry, not answered with the
receipt of a record that no longer exists; a key whose record is still there (or was
pruned, confirmed) keeps its first answer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.walrelay.shop_app import app as shop
from tests.walrelay.shop_tasks import reserve
from walrelay import Relay, RelaySettings
from walrelay.record import decode
from walstore import Options, SyncPolicy

pytestmark = pytest.mark.timeout(60)
SMALL = Options(sync=SyncPolicy.NONE, segment_bytes=8192, min_free_bytes=0)


def make(wal_dir: Path) -> Relay:
    settings = RelaySettings(wal_dir=str(wal_dir), idempotency_window=3600.0)
    return Relay(shop, str(wal_dir), settings=settings, wal_options=SMALL)


def test_a_key_lost_with_the_tail_is_sent_again_after_repair(tmp_path: Path) -> None:
    wal_dir = tmp_path / "wal"
    relay = make(wal_dir)
    kept = relay.send(reserve.s("kept"), key="kept")
    for i in range(60):
        relay.send(reserve.s(f"filler-{i}"))
    lost = relay.send(reserve.s("lost"), key="lost")
    relay.close()
    newest = sorted(wal_dir.glob("*.seg"))[-1]
    assert int(newest.stem) <= lost.lsn and int(newest.stem) > kept.lsn
    newest.unlink()
    repair = subprocess.run([sys.executable, "-m", "walstore.cli", "repair", str(wal_dir)],
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    assert repair.returncode == 0 and "LOST" in repair.stdout, repair.stdout + repair.stderr

    relay = make(wal_dir)
    try:
        again = relay.send(reserve.s("lost"), key="lost")
        found = {decode(p).key: lsn for lsn, p in relay.wal().iter_from(0)}
        assert found.get("lost") == again.lsn  # appended anew, and the receipt says where
        filler = relay.send(reserve.s("new"))  # takes a lost LSN: the row must not
        assert relay.send(reserve.s("lost"), key="lost") == again  # the new first answer
        assert relay.send(reserve.s("kept"), key="kept") == kept  # still in the log
        assert filler.lsn > again.lsn
    finally:
        relay.close()
