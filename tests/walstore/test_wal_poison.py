"""fsyncgate across processes: once any process poisons the log, no process acknowledges
anything and nothing clears the flag until the log is reopened (recovered).

Two ``Wal`` handles in one process are two processes as far as walstore's coordination
goes: each has its own descriptors (flock locks are per open file) and its own mapping of
the shared state."""

from __future__ import annotations

import errno
import threading
from pathlib import Path

import pytest

from tests.support.faultfs import FaultFs
from walstore import LogPoisonedError, Options, SyncPolicy, Wal
from walstore.fs import OsFs

pytestmark = pytest.mark.timeout(30)


class HookFs(OsFs):
    """Runs ``hook`` (once) in the middle of the next fdatasync of a segment."""

    def __init__(self) -> None:
        self.hook: threading.Thread | None = None

    def fdatasync(self, fd: int) -> None:
        hook, self.hook = self.hook, None
        if hook is not None:
            hook.start()
            hook.join(10)
        super().fdatasync(fd)


def opts(fs: OsFs) -> Options:
    return Options(segment_bytes=1 << 16, sync=SyncPolicy.ALWAYS, min_free_bytes=0, fs=fs)


def test_a_flush_never_clears_poison_set_by_another_process_meanwhile(tmp_path: Path) -> None:
    a_fs = HookFs()
    a = Wal.open(tmp_path, opts(a_fs))
    b = Wal.open(tmp_path, opts(FaultFs()))
    try:
        assert a.append(b"durable") == 0
        # While A's flush is in its fdatasync, B fails an I/O and poisons the log (the
        # kernel may have dropped dirty pages of the file, A's record's among them). Only
        # the write lock's holder writes or fsyncs now, so B's failure is injected at
        # the call it would make.
        a_fs.hook = threading.Thread(
            target=lambda: b._w.io_error("fsync", OSError(errno.EIO, "injected"))
        )
        with pytest.raises(LogPoisonedError):
            a.append(b"not acknowledged")  # its fsync "succeeded": fsyncgate says no
        assert a.poisoned and b.poisoned
        assert a.high_water_mark() == 1  # nothing past the poisoning became readable
        for wal in (a, b):
            with pytest.raises(LogPoisonedError):
                wal.append(b"x")
            with pytest.raises(LogPoisonedError):
                wal.sync()
        assert a.poisoned and b.poisoned  # sticky
    finally:
        a.close()
        b.close()
    with Wal.open(tmp_path, opts(OsFs())) as again:  # recovery: the only way out
        assert not again.poisoned
        got = [p for _, p in again.iter_from(0)]
        # The unacknowledged record may or may not be there (its outcome is unknown, as
        # for any append that raised).
        assert got in ([b"durable"], [b"durable", b"not acknowledged"])
        assert again.append(b"after") == len(got)
