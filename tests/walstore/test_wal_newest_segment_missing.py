"""Attack: with its newest segment deleted, the log silently becomes shorter: open,
``walstore verify`` and ``status`` all say it is fine, the lost LSNs are handed out again
to new records, and the idempotency index still answers a retried key with the receipt
of a record that no longer exists (so that purchase is never delivered, and its caller
is told it was committed).

DESIGN.md: corruption is reported "with segment, offset and reason and a non-zero exit -
never a silently shorter log"; a missing middle or oldest segment is refused. The newest
one's predecessor is sealed (a successor existed), so its loss is as detectable."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from celery import Celery

from walrelay import Relay, RelaySettings
from walstore import CorruptLogError, Options, SyncPolicy, Wal, WalError

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[2]
SMALL = Options(segment_bytes=8192, sync=SyncPolicy.NONE, min_free_bytes=0)


app = Celery("attack_seg", broker="memory://")


@app.task(name="attack_seg.ship")
def ship(tag: str) -> None: ...


def test_a_deleted_newest_segment_is_reported_not_forgotten(tmp_path: Path) -> None:
    wal = tmp_path / "wal"
    relay = Relay(app, str(wal), settings=RelaySettings(wal_dir=str(wal)), wal_options=SMALL)
    for i in range(60):
        relay.send(ship.s(f"filler-{i}"))
    keyed = relay.send(ship.s("order-42"), key="order-42")
    relay.close()
    segments = sorted(wal.glob("*.seg"))
    assert len(segments) >= 2
    segments[-1].unlink()  # the newest segment, holding the keyed record, is lost

    verify = subprocess.run([str(ROOT / ".venv/bin/walstore"), "verify", str(wal)],
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    refused = False
    try:
        with Wal.open(wal, SMALL) as log:
            next_lsn = log.next_lsn()
    except (CorruptLogError, WalError):
        refused = True
        next_lsn = -1
    # What happens today when it is not refused: the keyed record is gone, the same key
    # still answers with its receipt, and its LSN goes to a new record.
    if not refused:
        again = relay.send(ship.s("order-42"), key="order-42")
        newer = relay.send(ship.s("unrelated"))
        relay.close()
        detail = (f"next LSN after the loss {next_lsn} (was {keyed.lsn + 1}); retried key "
                  f"answered {again}; a new record got LSN {newer.lsn}")  # fmt: skip
    else:
        detail = "open refused"
    assert verify.returncode != 0 and refused, (
        f"verify exit {verify.returncode} ({verify.stdout.strip()}); {detail}"
    )
