"""The attach protocol: who recovers, who attaches to the shared state, and what happens
when an operator (or a cleanup cron) removes or replaces the files the processes share
while they run, or runs ``walstore repair`` while another process opens the log.

Two ``Wal`` handles in one process behave as two processes here: each has its own
descriptors (flock and OFD locks belong to an open file, not to a process) and its own
mapping of the shared state. Each test pauses one side at a chosen call (``PauseFs``) to
force the interleaving the review found; the invariant is always the same: no LSN handed
out twice, no acknowledged record lost, and a refusal is an explicit error."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from walstore import LogBusyError, Options, SyncPolicy, Wal, WalError
from walstore.fs import OsFs
from walstore.inspect import snapshot, verify
from walstore.repair import repair

pytestmark = pytest.mark.timeout(60)

SEG = 8192


class PauseFs(OsFs):
    """Pauses the first call of ``op`` whose path contains ``match`` once armed: signals
    ``paused`` and waits for ``resume`` (before the call with ``before``, else after)."""

    def __init__(self) -> None:
        self.op = ""
        self.match = ""
        self.before = False
        self.paused = threading.Event()
        self.resume = threading.Event()
        self._paths: dict[int, str] = {}

    def arm(self, op: str, match: str = "", before: bool = False) -> None:
        self.op, self.match, self.before = op, match, before
        self.paused.clear()
        self.resume.clear()

    def _maybe_pause(self, op: str, path: str, before: bool) -> None:
        if self.op == op and self.match in path and self.before == before:
            self.op = ""
            self.paused.set()
            assert self.resume.wait(20), "never resumed"

    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        fd = super().open(path, flags, mode)
        self._paths[fd] = path
        return fd

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> None:
        self._maybe_pause("pwrite", self._paths.get(fd, ""), True)
        super().pwrite(fd, data, offset)
        self._maybe_pause("pwrite", self._paths.get(fd, ""), False)

    def rename(self, src: str, dst: str) -> None:
        self._maybe_pause("rename", dst, True)
        super().rename(src, dst)
        self._maybe_pause("rename", dst, False)

    def fsync_dir(self, path: str) -> None:
        self._maybe_pause("fsync_dir", path, True)
        super().fsync_dir(path)


def opts(fs: OsFs | None = None, **kw: Any) -> Options:
    base: dict[str, Any] = {"segment_bytes": SEG, "min_free_bytes": 0, "fs": fs}
    base.update(kw)
    return Options(**base)


class Background:
    """Run ``fn`` in a thread; ``result()`` returns its value or raises its exception."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._value = fn()
        except BaseException as exc:
            self._error = exc

    def done(self, timeout: float = 0.0) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def result(self, timeout: float = 20) -> Any:
        assert self.done(timeout), "still running"
        if self._error is not None:
            raise self._error
        return self._value


def records(path: Path) -> list[tuple[int, bytes]]:
    with Wal.open(path, opts()) as wal:
        return list(wal.iter_from(wal.first_lsn()))


def assert_acked_survive(path: Path, acked: dict[int, bytes]) -> None:
    """Every acknowledged (lsn, payload) is in the log, at its LSN."""
    got = dict(records(path))
    missing = {lsn: p for lsn, p in acked.items() if got.get(lsn) != p}
    assert not missing, f"acknowledged records lost or overwritten: {missing}"


# ----------------------------------------------------------------- repair vs open
def test_a_process_opening_during_repair_never_attaches_to_the_pre_repair_state(
    tmp_path: Path,
) -> None:
    """A bit flip mid newest segment; repair runs; meanwhile another process opens. It is
    refused at once (LogBusyError): before, it waited for the attach lock, then attached
    to the pre-repair salt and offsets, and the next open cut its appends."""
    with Wal.open(tmp_path, opts()) as wal:  # leaves a valid-looking shm behind
        for i in range(20):
            wal.append(f"r{i}".encode().ljust(100, b"."))
    seg = sorted(tmp_path.glob("*.seg"))[-1]
    raw = bytearray(seg.read_bytes())
    raw[64 + 5 * 120 + 40] ^= 1  # inside record 5's payload: valid records follow
    seg.write_bytes(bytes(raw))
    assert not verify(str(tmp_path)).ok  # the operator's check: no open, shm untouched

    fs = PauseFs()
    fs.arm("rename", ".seg", before=False)  # repair has rewritten the newest segment
    repairing = Background(lambda: repair(str(tmp_path), fs))
    assert fs.paused.wait(20)
    opener = Background(lambda: Wal.open(tmp_path, opts()))
    refused = opener.done(5)  # before the fix: it waited, then attached to the old state
    fs.resume.set()
    assert refused, "an open during repair neither refused nor failed"
    with pytest.raises(LogBusyError, match=r"walstore repair \(pid \d+\) is running"):
        opener.result()
    report = repairing.result()
    assert report.lost == [(5, 6)]
    wal = Wal.open(tmp_path, opts())
    acked = {wal.append(b"after repair"): b"after repair"}
    wal.close()
    assert acked == {20: b"after repair"}
    assert_acked_survive(tmp_path, acked)
    assert len(records(tmp_path)) == 20  # 19 salvaged + the new one (5 is lost)


def test_repair_refuses_a_log_that_is_open(tmp_path: Path) -> None:
    with Wal.open(tmp_path, opts()) as wal:
        wal.append(b"x")
        with pytest.raises(LogBusyError, match="open in another process"):
            repair(str(tmp_path))


# ----------------------------------------------------------------- files removed or replaced
def test_removing_lock_never_lets_a_second_recovery_run_beside_an_appender(
    tmp_path: Path,
) -> None:
    """A removes nothing; an operator removes LOCK while A appends; B opens. Before, B
    recovered beside A: A appended meanwhile, then B published the state it had scanned,
    and the next append got an LSN A had already handed out (and its bytes)."""
    a = Wal.open(tmp_path, opts(sync=SyncPolicy.ALWAYS))
    acked = {a.append(b"a0"): b"a0"}
    os.unlink(tmp_path / "LOCK")
    b_fs = PauseFs()
    b_fs.arm("fsync_dir", str(tmp_path), before=True)  # B scanned the disk, if it recovers
    opening = Background(lambda: Wal.open(tmp_path, opts(b_fs, sync=SyncPolicy.ALWAYS)))
    b_fs.paused.wait(1.0)
    for payload in (b"a1", b"a2"):  # A appends while B (maybe) recovers
        acked[a.append(payload)] = payload
    b_fs.resume.set()
    b = opening.result()
    for payload in (b"b0", b"b1"):
        lsn = b.append(payload)
        assert lsn not in acked, f"LSN {lsn} handed out twice"
        acked[lsn] = payload
    lsn = a.append(b"a3")
    assert lsn not in acked, f"LSN {lsn} handed out twice"
    acked[lsn] = b"a3"
    a.close()
    b.close()
    assert sorted(acked) == list(range(6))
    assert_acked_survive(tmp_path, acked)


def test_removing_shm_while_attached_is_refused_at_once_and_by_name(tmp_path: Path) -> None:
    a = Wal.open(tmp_path, opts())
    acked = {a.append(b"a0"): b"a0"}
    os.unlink(tmp_path / "shm")
    started = time.monotonic()
    with pytest.raises(WalError, match="shm") as info:
        Wal.open(tmp_path, opts())
    assert time.monotonic() - started < 1.0, "refused only after a long wait"
    assert "removed or replaced" in str(info.value)
    with pytest.raises(WalError, match="shm"):
        snapshot(str(tmp_path))  # status cannot show live figures either, and says why
    acked[a.append(b"a1")] = b"a1"  # the processes attached keep working
    a.close()
    with Wal.open(tmp_path, opts()) as b:  # once they are gone, the log opens again
        acked[b.append(b"b0")] = b"b0"
    assert sorted(acked) == [0, 1, 2]
    assert_acked_survive(tmp_path, acked)


def test_shm_replaced_by_a_stale_copy_is_never_trusted(tmp_path: Path) -> None:
    """``cp shm shm.bak`` then ``mv shm.bak shm`` later: a valid-looking but stale state.
    Attaching to it would hand out LSNs again."""
    a = Wal.open(tmp_path, opts())
    acked = {a.append(b"a0"): b"a0"}
    shutil.copy(tmp_path / "shm", tmp_path / "shm.bak")
    for payload in (b"a1", b"a2"):
        acked[a.append(payload)] = payload
    os.replace(tmp_path / "shm.bak", tmp_path / "shm")
    try:
        b = Wal.open(tmp_path, opts())
    except WalError as exc:
        assert "shm" in str(exc) and "removed or replaced" in str(exc)
    else:
        lsn = b.append(b"b0")
        assert lsn not in acked, f"LSN {lsn} handed out twice"
        acked[lsn] = b"b0"
        b.close()
    acked[a.append(b"a3")] = b"a3"
    a.close()
    assert_acked_survive(tmp_path, acked)


@pytest.mark.parametrize("name", ["append.lock"])
def test_a_replaced_lock_file_is_refused_by_name(tmp_path: Path, name: str) -> None:
    """Appenders that do not share the append lock write at the same offset (the same
    LSN twice); flush leaders that do not share the lead lock can move the high water
    mark back. A process must not attach with lock files the others do not use."""
    a_fs = PauseFs()
    a = Wal.open(tmp_path, opts(a_fs))
    acked = {a.append(b"a0"): b"a0"}
    os.unlink(tmp_path / name)
    a_fs.arm("pwrite", ".seg", before=True)
    appending = Background(lambda: a.append(b"a1"))  # holds A's append lock, not written
    assert a_fs.paused.wait(10)
    b: Wal | None = None
    try:
        with pytest.raises(WalError, match=name) as info:
            b = Wal.open(tmp_path, opts())
        assert "removed or replaced" in str(info.value)
    finally:
        if b is not None:  # before the fix: B shares no append lock with A
            b_appending = Background(lambda: b.append(b"b0"))
            b_appending.done(0.3)
        a_fs.resume.set()
        acked[appending.result()] = b"a1"
        if b is not None:
            lsn = b_appending.result()
            assert lsn not in acked, f"LSN {lsn} handed out twice"
            b.close()
        a.close()
    assert_acked_survive(tmp_path, acked)


def test_stale_shared_state_of_crashed_processes_is_never_attached_to(tmp_path: Path) -> None:
    """Every process died and the power went: the shared state file reached the disk
    with one record more than the segment did. A process that did not recover itself
    (it waited on the attach lock while something else held it briefly, as a probe
    does) must not trust that state: it would append after a hole of zeros, and the
    next open would refuse the log (valid records after a bad one)."""
    import fcntl

    a = Wal.open(tmp_path, opts())
    acked = {a.append(b"a0"): b"a0"}
    st = a._shm.write_state()
    a._shm.set_write(st._replace(offset=st.offset + 120, next_lsn=st.next_lsn + 1))
    a._abandon()  # kill -9, then the power cut: shm says 2 records, the segment holds 1
    holders = [os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY), os.open(tmp_path / "LOCK", 0)]
    for fd in holders:  # a brief exclusive holder
        fcntl.flock(fd, fcntl.LOCK_EX)
    opening = Background(lambda: Wal.open(tmp_path, opts()))
    time.sleep(0.2)
    for fd in holders:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    b = opening.result()
    acked[b.append(b"b0")] = b"b0"
    b.close()
    assert records(tmp_path) == [(0, b"a0"), (1, b"b0")]
    assert_acked_survive(tmp_path, acked)
