"""A process forked while it had the log open (a web server's master preloading the
app): the child's copies of the log's lock descriptors must not keep the parent's locks
alive after the parent died (review 5: a parent killed mid-append, with a child that
lived on, left the write lock taken, and every append of every process hung)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from walstore import LogClosedError, Options, Wal

ROOT = Path(__file__).resolve().parents[2]
OPTS = Options(segment_bytes=1 << 20, min_free_bytes=0)

# Opens the log, appends, takes the write lock (mid-append), forks a child that lives on
# without touching the log, prints the child's pid and dies holding the lock.
_PARENT = """
import os, signal, sys, time
from walstore import Options, Wal
wal = Wal.open(sys.argv[1], Options(segment_bytes=1 << 20, min_free_bytes=0))
wal.append(b"before")
wal._att.wlock.acquire()
child = os.fork()
if child == 0:
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("held", ["write lock", "low water mark lock"])
def test_a_child_does_not_keep_a_dead_parents_locks(tmp_path: Path, held: str) -> None:
    """The write lock (flock on append.lock), and the low water mark's lock, an OFD lock
    on shm, whose descriptor CPython's mmap duplicates (review 6: the child's copy of the
    mapping kept it, and every other process's set_low_water_mark hung)."""
    wal_dir = tmp_path / "wal"
    take = {"write lock": "wal._att.wlock.acquire()",
            "low water mark lock": "wal._shm.lock_low_water_mark()"}[held]  # fmt: skip
    script = _PARENT.replace("wal._att.wlock.acquire()", take)
    parent = subprocess.Popen([sys.executable, "-c", script, str(wal_dir)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert parent.stdout is not None
    child = int(parent.stdout.readline())  # (the child keeps the pipe open: no EOF)
    parent.stdout.close()
    assert parent.wait(30) == -signal.SIGKILL
    try:
        done: list[object] = []

        def append() -> None:
            with Wal.open(wal_dir, OPTS) as wal:
                done.append(wal.append(b"after"))
                wal.set_low_water_mark(1)
                done.append("confirmed")

        worker = threading.Thread(target=append, daemon=True)
        worker.start()
        worker.join(10)
        assert done == [1, "confirmed"], f"hung behind the dead parent's {held}"
    finally:
        os.kill(child, signal.SIGKILL)
    with Wal.open(wal_dir, OPTS) as wal:
        assert [p for _, p in wal.iter_from(1)] == [b"after"]


@pytest.mark.timeout(30)
def test_a_handle_opened_before_a_fork_is_closed_in_the_child(tmp_path: Path) -> None:
    wal = Wal.open(tmp_path / "wal", OPTS)
    wal.append(b"parent")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its copy says so, and its own open works
        code = 1
        try:
            try:
                wal.append(b"child")
            except LogClosedError as exc:
                if "fork" in str(exc):
                    with Wal.open(tmp_path / "wal", OPTS) as own:
                        own.append(b"child")
                    wal.close()  # harmless
                    code = 0
        finally:
            os.write(write, bytes([code]))
            os._exit(code)
    os.close(write)
    assert os.read(read, 1) == b"\x00"
    os.close(read)
    os.waitpid(pid, 0)
    assert wal.append(b"parent again") == 2  # the parent's handle is the parent's still
    assert [p for _, p in wal.iter_from(0)] == [b"parent", b"child", b"parent again"]
    wal.close()
