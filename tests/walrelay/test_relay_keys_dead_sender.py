"""A keyed sender killed while its record waits in a group-commit slot (another process
leads a slow flush): its record is written by the next leader, after it died. The next
sender of that key must find it (review 4: ``sync`` returned at once, since the slot's
record was not counted yet, the index found nothing, and the key got two records)."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.walrelay.shop_app import app as shop
from tests.walrelay.shop_tasks import reserve
from tests.walrelay.test_relay_keys import keyed
from walrelay import Relay, RelaySettings
from walstore import Options, SyncPolicy

ROOT = Path(__file__).resolve().parents[2]


def make(wal_dir: Path) -> Relay:
    """A relay on a log that fsyncs every append, as in production (with SyncPolicy.NONE
    every sync leads a flush of its own, which hid the defect)."""
    options = Options(sync=SyncPolicy.ALWAYS, segment_bytes=1 << 20)
    settings = RelaySettings(wal_dir=str(wal_dir), idempotency_window=3600.0)
    return Relay(shop, str(wal_dir), settings=settings, wal_options=options)


# Sends one keyed record per key read on stdin; says "sent <lsn>" after each.
_SENDER = """
import sys
from pathlib import Path
from tests.walrelay.shop_tasks import reserve
from tests.walrelay.test_relay_keys_dead_sender import make
relay = make(Path(sys.argv[1]))
print("ready", flush=True)
for line in sys.stdin:
    key = line.strip()
    print("sent", relay.send(reserve.s({"o": key}), key=key).lsn, flush=True)
"""


@pytest.mark.timeout(60)
def test_a_key_whose_sender_died_waiting_in_a_slot_is_found(tmp_path: Path) -> None:
    wal_dir = tmp_path / "wal"
    relay = make(wal_dir)  # the live process that sends the key after the crash
    relay.send(reserve.s({"o": "warm"}), key="warm")
    victim = subprocess.Popen([sys.executable, "-c", _SENDER, str(wal_dir)], cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert victim.stdin is not None and victim.stdout is not None
    lock = os.open(wal_dir / "append.lock", os.O_RDWR)
    try:
        assert victim.stdout.readline().strip() == "ready"
        # Its first append while another process holds the write lock: it takes a slot.
        fcntl.flock(lock, fcntl.LOCK_EX)
        victim.stdin.write("first\n")
        victim.stdin.flush()
        time.sleep(0.3)
        fcntl.flock(lock, fcntl.LOCK_UN)
        assert victim.stdout.readline().startswith("sent")
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process leads a slow flush
        victim.stdin.write("K\n")
        victim.stdin.flush()
        time.sleep(0.5)  # its record waits in its slot
        assert victim.poll() is None
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        os.close(lock)
        if victim.poll() is None:
            victim.kill()
            victim.wait(10)
        victim.stdin.close()
        victim.stdout.close()
    first = relay.send(reserve.s({"o": "K"}), key="K")
    again = relay.send(reserve.s({"o": "K"}), key="K")
    assert again == first
    assert keyed(relay).count("K") == 1
    relay.close()
