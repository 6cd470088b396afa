"""Eight processes append to one log at once while some are SIGKILLed at random moments:
the log verifies, and every acknowledged record is present exactly once at its LSN."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from walstore import Options, Wal
from walstore.inspect import verify

APPENDER = Path(__file__).resolve().parents[1] / "support" / "wal_appender.py"
SEGMENT = 256 * 1024  # small, so roll-overs happen while processes are being killed


def _spawn(directory: Path, acks: Path, ident: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    return subprocess.Popen(
        [sys.executable, str(APPENDER), str(directory), str(acks), ident, str(SEGMENT)], env=env
    )


def _acknowledged(ack_dir: Path) -> dict[int, str]:
    acked: dict[int, str] = {}
    for path in ack_dir.glob("*.acks"):
        for line in path.read_text().splitlines():
            parts = line.split(" ")
            if len(parts) == 2:  # a line cut by the kill was never complete: ignore it
                lsn, tag = int(parts[0]), parts[1]
                assert lsn not in acked, f"LSN {lsn} acknowledged twice"
                acked[lsn] = tag
    return acked


def _ack_lines(ack_dir: Path) -> int:
    return sum(path.read_bytes().count(b"\n") for path in ack_dir.glob("*.acks"))


@pytest.mark.timeout(120)
def test_killed_appenders_leave_a_consistent_log(tmp_path: Path) -> None:
    wal_dir, ack_dir = tmp_path / "wal", tmp_path / "acks"
    ack_dir.mkdir()
    Wal.open(wal_dir, Options(segment_bytes=SEGMENT)).close()
    rng = random.Random(1234)
    procs = {f"p{i}": _spawn(wal_dir, ack_dir / f"p{i}.acks", f"p{i}") for i in range(8)}
    kills, spawned = 0, 8
    # At least 8 s, and until enough happened (a loaded machine starts Python slowly):
    # bounded by the test's timeout all the same.
    started = time.monotonic()
    while time.monotonic() - started < 60 and kills < 40:
        if time.monotonic() - started > 8 and kills >= 10 and _ack_lines(ack_dir) > 600:
            break
        time.sleep(rng.uniform(0.02, 0.25))
        # Kill only processes that are appending: one still starting up tests nothing.
        appending = [i for i in sorted(procs) if (ack_dir / f"{i}.acks").exists()]
        if not appending:
            continue
        victim = rng.choice(appending)
        procs[victim].send_signal(signal.SIGKILL)
        procs[victim].wait(10)
        kills += 1
        ident = f"p{spawned}"
        spawned += 1
        procs[ident] = _spawn(wal_dir, ack_dir / f"{ident}.acks", ident)
        del procs[victim]
    for proc in procs.values():
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    acked = _acknowledged(ack_dir)
    assert kills >= 10 and len(acked) > 500, (kills, len(acked))
    report = verify(str(wal_dir))
    assert report.ok, report.problems
    with Wal.open(wal_dir, Options(segment_bytes=SEGMENT)) as wal:
        records = list(wal.iter_from(0))
    lsns = [lsn for lsn, _ in records]
    assert lsns == list(range(len(records))), "LSNs are not contiguous from 0"
    tags = [payload.split(b"|", 1)[0].decode() for _, payload in records]
    assert len(set(tags)) == len(tags), "a record is present twice"
    by_lsn = dict(zip(lsns, tags, strict=True))
    missing = {lsn: tag for lsn, tag in acked.items() if by_lsn.get(lsn) != tag}
    assert not missing, (
        f"{len(missing)} acknowledged records missing or moved: {list(missing.items())[:5]}"
    )


@pytest.mark.timeout(30)
def test_remnant_of_a_dead_appender_never_lands_mid_log(tmp_path: Path) -> None:
    """An appender killed after its pwrite but before publishing its new end leaves whole
    records past the end. The next appender writes a shorter record there: without the
    clean-up those stale records would sit after it, and the log would refuse to open."""
    from walstore.format import pack_record
    from walstore.shm import INTENT_APPEND

    wal = Wal.open(tmp_path, Options(segment_bytes=SEGMENT))
    wal.append(b"before")
    st = wal._shm.write_state()
    stale = b"".join(pack_record(st.salt, st.next_lsn + i, b"s" * 300) for i in range(3))
    wal._shm.set_write(st._replace(intent=INTENT_APPEND, pending_end=st.offset + len(stale)))
    fd = os.open(tmp_path / f"{st.active:020d}.seg", os.O_WRONLY)
    os.pwrite(fd, stale, st.offset)  # the dead process's complete write
    os.close(fd)
    assert wal.append(b"short") == 1
    wal.close()
    with Wal.open(tmp_path, Options(segment_bytes=SEGMENT)) as reopened:
        assert [payload for _, payload in reopened.iter_from(0)] == [b"before", b"short"]
        assert reopened.next_lsn() == 2


@pytest.mark.timeout(30)
def test_flush_waits_for_a_preempted_writer_instead_of_failing(tmp_path: Path) -> None:
    """An appender preempted in the middle of its shared-state update leaves the state torn
    for as long as it is off the CPU (milliseconds on a loaded machine). A flush that needs
    a snapshot must wait for it behind the append lock, not give up."""
    import threading

    wal = Wal.open(tmp_path, Options(segment_bytes=SEGMENT))
    other = Wal.open(tmp_path, Options(segment_bytes=SEGMENT))  # the "preempted" process
    wal.append(b"x")
    st = wal._shm.write_state()
    other._att.wlock.acquire()
    off = 72 + 64 * (wal._shm._mm[64] & 1)  # the current write region (walstore.shm)
    wal._shm._mm[off + 8] ^= 0xFF  # break its checksum

    def finish_update() -> None:
        time.sleep(0.3)
        other._shm.set_write(st)
        other._att.wlock.release()

    t = threading.Thread(target=finish_update)
    t.start()
    started = time.monotonic()
    assert wal.sync() == st.next_lsn
    assert time.monotonic() - started >= 0.25  # it really waited for the writer
    t.join()
    assert wal.append(b"y") == st.next_lsn
    other.close()
    wal.close()
