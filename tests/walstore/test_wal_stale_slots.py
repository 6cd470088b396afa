"""A producer killed while its payload waited in a slot of the shared state, with every
other process gone too: the next opener recovers the log, and that payload was not in it.
It must never turn up later. It did: recovery left the slot ready, and a later leader
wrote it once another producer's claim raised the slot hint past it (a claim and its
reset are two steps), after the key index had concluded from the log that the dead
sender's record was not there (review: a retry then appended a second record)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from walstore import Options, SyncPolicy, Wal

pytestmark = pytest.mark.timeout(60)

OPTS = Options(sync=SyncPolicy.ALWAYS, segment_bytes=65536, min_free_bytes=0)

DIE_WAITING = textwrap.dedent("""
    import os, signal, sys
    from walstore import Options, SyncPolicy, Wal
    wal = Wal.open(sys.argv[1], Options(sync=SyncPolicy.ALWAYS, segment_bytes=65536,
                                        min_free_bytes=0))
    wal.append(b"durable")
    writer = wal._w
    slot = writer._pool.get()
    assert slot == 0, slot
    wal._shm.fill_slot(slot, [b"ghost"])  # ready: waiting for a leader
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_dead_producers_waiting_payload_never_reaches_the_log_after_recovery(
    tmp_path: Path,
) -> None:
    died = subprocess.run([sys.executable, "-c", DIE_WAITING, str(tmp_path)], timeout=30)
    assert died.returncode == -signal.SIGKILL
    with Wal.open(tmp_path, OPTS) as first, Wal.open(tmp_path, OPTS) as second:
        assert [p for _, p in first.iter_from(0)] == [b"durable"]  # recovered without it
        # Two producers claim slots at once: the first has claimed slot 0 and not yet
        # reset it when the second's claim of slot 1 raises the hint past slot 0.
        assert first._shm.try_claim_slot(0)
        assert second._w._pool.get() == 1
        second.append(b"after")
        first.append(b"after-2")
        found = [bytes(p) for _, p in second.iter_from(0)]
    assert b"ghost" not in found, found
    assert found == [b"durable", b"after", b"after-2"]
    assert not os.path.exists(tmp_path / "torn")
