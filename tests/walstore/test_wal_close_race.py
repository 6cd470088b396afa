"""``close`` while other threads of the process append, sync, confirm or ask for status.

close used to let go of the segment descriptors and the shared mapping under calls still
running: they failed with whatever broke first (``ValueError: mmap closed``, a bad file
descriptor), and a descriptor closed under a leader could be reused by an unrelated file
before its pwrite. close now waits for the calls under way; a call made after it gets
LogClosedError, and every append that returned an LSN is in the log."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from walstore import LogClosedError, Options, SyncPolicy, Wal


def test_close_waits_for_the_calls_under_way(tmp_path: Path) -> None:
    directory = tmp_path / "wal"
    opts = Options(segment_bytes=16384, min_free_bytes=0)
    wrong: list[BaseException] = []
    acked: set[int] = set()
    for _round in range(25):
        wal = Wal.open(directory, opts)
        go = threading.Event()

        def appender(wal: Wal = wal, go: threading.Event = go) -> None:
            go.wait()
            try:
                for _ in range(10_000):
                    acked.add(wal.append(b"r" * 200))
                    acked.update(wal.append_batch([b"a" * 100, b"b" * 100]))
            except LogClosedError:
                pass
            except BaseException as exc:  # collected, asserted on below
                wrong.append(exc)

        def other(call: Callable[[], object], go: threading.Event = go) -> None:
            go.wait()
            try:
                for _ in range(100_000):
                    call()
            except LogClosedError:
                pass
            except BaseException as exc:  # collected, asserted on below
                wrong.append(exc)

        threads = [threading.Thread(target=appender) for _ in range(3)]
        threads += [
            threading.Thread(target=other, args=(call,))
            for call in (
                wal.sync,
                wal.status,
                wal.high_water_mark,
                lambda wal=wal: wal.set_low_water_mark(wal.high_water_mark()),
            )
        ]
        for t in threads:
            t.start()
        go.set()
        time.sleep(0.01 + _round * 0.002)
        wal.close()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        assert wrong == [], f"{len(wrong)} calls failed otherwise than closed: {wrong[:3]!r}"
    with Wal.open(directory, opts) as wal:
        lwm = wal.low_water_mark()
        present = {lsn for lsn, _ in wal.iter_from(lwm)}
    missing = {lsn for lsn in acked if lsn >= lwm} - present
    assert acked and not missing, f"{len(missing)} acknowledged appends are not in the log"


def test_two_threads_closing_one_handle_both_return(tmp_path: Path) -> None:
    """The second close waits for the first (it let go of the mapping and descriptors
    while the other was still flushing: AttributeError, EBADF, 'mmap closed')."""
    wrong: list[BaseException] = []
    for _round in range(40):
        wal = Wal.open(tmp_path / "wal", Options(min_free_bytes=0))
        wal.append(b"x")
        barrier = threading.Barrier(2)

        def closer(wal: Wal = wal, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            try:
                wal.close()
            except BaseException as exc:  # collected, asserted on below
                wrong.append(exc)

        threads = [threading.Thread(target=closer) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert wrong == [], f"{len(wrong)} closes failed: {wrong[:3]!r}"


SLOW_APPENDER = """
import sys, time
from walstore import Options, Wal
from walstore.fs import OsFs
class SlowFs(OsFs):
    def fdatasync(self, fd):
        time.sleep(0.3)
        super().fdatasync(fd)
wal = Wal.open(sys.argv[1], Options(min_free_bytes=0, fs=SlowFs()))
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    wal.append(b"other")  # one slow flush after another, the write lock retaken at once
wal.close()
"""


@pytest.mark.parametrize("policy", [SyncPolicy.ALWAYS, SyncPolicy.NONE])
def test_close_and_sync_are_not_starved_by_another_process_appending(
    tmp_path: Path, policy: SyncPolicy
) -> None:
    """With nothing of its own left to flush, close (and sync) waited for the write lock
    for as long as another process kept retaking it: for that process's lifetime."""
    directory = tmp_path / "wal"
    wal = Wal.open(directory, Options(min_free_bytes=0, sync=policy))
    lsn = wal.append(b"mine")
    other = subprocess.Popen(
        [sys.executable, "-c", SLOW_APPENDER, str(directory), "8"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        start = time.monotonic()
        assert wal.sync() > lsn
        synced = time.monotonic() - start
        start = time.monotonic()
        wal.close()
        closed = time.monotonic() - start
    finally:
        other.wait(60)
        assert other.stdout is not None
        other.stdout.close()
    # A flush of the other process under way (0.3 s) may be waited for; not its lifetime.
    assert synced < 2.0 and closed < 2.0, (synced, closed)
