"""The fault matrix, injected half: fsync and ENOSPC errors from the file layer, and the
process killed at every mutating call of a roll-over, a prune and a recovery, each
followed (or not) by a power loss. Every case asserts exactly what survives and which
error is raised. The on-disk damage cases are in ``test_wal_faults.py``."""

from __future__ import annotations

import errno
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.faultfs import FaultFs, SimulatedCrash
from walstore import LogFullError, LogPoisonedError, Options, SyncPolicy, Wal, WalError
from walstore.inspect import verify

pytestmark = pytest.mark.timeout(60)

SEG = 4160
PAY = 100  # 120-byte records: 34 fill a segment
PER_SEGMENT = (SEG - 64) // (PAY + 20)


def fopts(fs: FaultFs | None = None, **kw: Any) -> Options:
    base: dict[str, Any] = {
        "segment_bytes": SEG,
        "preallocate": True,
        "min_free_bytes": 0,
        "sync": SyncPolicy.ALWAYS,
        "fs": fs,
    }
    base.update(kw)
    return Options(**base)


def payload(lsn: int) -> bytes:
    head = f"rec-{lsn}:".encode()
    return head + bytes([1 + lsn % 250]) * (PAY - len(head))


def expected(stop: int, start: int = 0) -> list[tuple[int, bytes]]:
    return [(i, payload(i)) for i in range(start, stop)]


def fill(wal: Wal, count: int) -> None:
    start = wal.next_lsn()
    for i in range(start, start + count):
        assert wal.append(payload(i)) == i


def read_all(wal: Wal, start: int | None = None) -> list[tuple[int, bytes]]:
    return [(lsn, data) for lsn, data in wal.iter_from(wal.first_lsn() if start is None else start)]


def contents(path: Path) -> list[tuple[int, bytes]]:
    """Open the log as a fresh process would (recovery), read everything, close."""
    with Wal.open(path, fopts()) as wal:
        return read_all(wal)


def assert_healthy(path: Path, end: int) -> None:
    """The log verifies, has no leftovers, and takes the next append at ``end``."""
    assert not list(path.glob("*.tmp"))
    assert verify(str(path)).ok, verify(str(path)).problems
    with Wal.open(path, fopts()) as wal:
        assert wal.append(b"after") == end
    assert contents(path)[-1] == (end, b"after")


def recover_then_power_loss(case: Path, fs: FaultFs) -> tuple[list[tuple[int, bytes]], int]:
    """Recover through ``fs`` (which still knows what is unsynced), append one record,
    cut the power: what recovery found and the acknowledged record must all survive.
    Returns (records recovered, low water mark)."""
    wal = Wal.open(case, fopts(fs))
    got, lwm = read_all(wal), wal.low_water_mark()
    end = wal.append(b"acked")
    wal._abandon()
    fs.crash()
    with Wal.open(case, fopts()) as wal:
        assert read_all(wal) == [*got, (end, b"acked")]
        assert wal.low_water_mark() == lwm
    assert_healthy(case, end + 1)
    return got, lwm


# ----------------------------------------------------------------- fsync errors
@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC])
@pytest.mark.parametrize("power_loss", [True, False], ids=["power-loss", "reopen"])
def test_fsync_error_poisons_until_every_process_reopens(
    tmp_path: Path, err: int, power_loss: bool
) -> None:
    fs = FaultFs()
    wal = Wal.open(tmp_path, fopts(fs))
    fill(wal, 5)
    fs.inject("fdatasync", err, match=".seg")
    with pytest.raises(LogPoisonedError):
        wal.append(payload(5))
    assert wal.poisoned
    assert wal.high_water_mark() == 5  # readers never see the unacknowledged record
    assert read_all(wal) == expected(5)
    writes = fs.calls["pwrite"]
    for call in (lambda: wal.append(b"x"), lambda: wal.append_batch([b"y"]), wal.sync):
        with pytest.raises(LogPoisonedError):
            call()
    other = Wal.open(tmp_path, fopts(fs))  # another process attaching meanwhile
    with pytest.raises(LogPoisonedError):
        other.append(b"z")
    assert fs.calls["pwrite"] == writes  # refused before writing anything
    if power_loss:
        wal._abandon()
        other._abandon()
        fs.crash()
    else:
        wal.close()
        again = Wal.open(tmp_path, fopts(fs))  # ``other`` still has it open: no recovery
        with pytest.raises(LogPoisonedError):
            again.append(b"z")
        again.close()
        other.close()
    got, _lwm = recover_then_power_loss(tmp_path, fs)
    # The failed append's outcome is unknown, as for any append that did not return:
    # after a power loss it is gone; after a plain reopen its bytes were still in the
    # page cache, so recovery found them and made them durable.
    assert got == expected(5 if power_loss else 6)


@pytest.mark.parametrize("op", ["fdatasync", "fsync_dir"], ids=["seal", "new-segment-dir"])
@pytest.mark.parametrize("power_loss", [True, False], ids=["power-loss", "reopen"])
def test_fsync_error_during_roll_over_poisons(tmp_path: Path, op: str, power_loss: bool) -> None:
    fs = FaultFs()
    wal = Wal.open(tmp_path, fopts(fs))
    fill(wal, PER_SEGMENT)
    fs.inject(op, errno.EIO, match="00000000000000000000.seg" if op == "fdatasync" else "")
    with pytest.raises(LogPoisonedError):
        wal.append(payload(PER_SEGMENT))  # needs a new segment
    assert wal.poisoned
    with pytest.raises(LogPoisonedError):
        wal.append(payload(PER_SEGMENT))
    assert (wal.next_lsn(), wal.high_water_mark()) == (PER_SEGMENT, PER_SEGMENT)
    if power_loss:
        wal._abandon()
        fs.crash()
    else:
        wal.close()
    got, _lwm = recover_then_power_loss(tmp_path, fs)
    assert got == expected(PER_SEGMENT)


def test_fsync_error_on_the_checkpoint_keeps_the_old_mark(tmp_path: Path) -> None:
    fs = FaultFs()
    with Wal.open(tmp_path, fopts(fs)) as wal:
        fill(wal, 3 * PER_SEGMENT)
        before = sorted(p.name for p in tmp_path.glob("*.seg"))
        fs.inject("fsync", errno.EIO, match="CHECKPOINT")
        with pytest.raises(WalError, match="low water mark") as info:
            wal.set_low_water_mark(2 * PER_SEGMENT)
        assert isinstance(info.value.__cause__, OSError)
        assert info.value.__cause__.errno == errno.EIO
        assert not list(tmp_path.glob("CHECKPOINT*.tmp"))  # the failed temp file is gone
        assert wal.low_water_mark() == 0
        assert sorted(p.name for p in tmp_path.glob("*.seg")) == before
        assert not wal.poisoned  # a new checkpoint file is written next time: retry
        assert wal.set_low_water_mark(2 * PER_SEGMENT) == 2
        assert wal.low_water_mark() == 2 * PER_SEGMENT
    assert contents(tmp_path) == expected(3 * PER_SEGMENT, 2 * PER_SEGMENT)


# ----------------------------------------------------------------- disk full
@pytest.mark.parametrize("op", ["create", "pwrite", "fdatasync"])
def test_enospc_creating_a_segment_appends_nothing(tmp_path: Path, op: str) -> None:
    fs = FaultFs()
    with Wal.open(tmp_path, fopts(fs)) as wal:
        fill(wal, PER_SEGMENT)
        fs.inject(op, errno.ENOSPC, match=".seg.tmp", times=None)
        for _ in range(2):  # every attempt, not just the first
            with pytest.raises(LogFullError):
                wal.append_batch([payload(PER_SEGMENT), payload(PER_SEGMENT + 1)])
        assert not wal.poisoned
        assert (wal.next_lsn(), wal.high_water_mark()) == (PER_SEGMENT, PER_SEGMENT)
        assert [p.name for p in tmp_path.glob("*.seg*")] == ["00000000000000000000.seg"]
        assert read_all(wal) == expected(PER_SEGMENT)
        fs.clear_faults()  # space freed
        fill(wal, 2)
        assert len(list(tmp_path.glob("*.seg"))) == 2
        assert read_all(wal) == expected(PER_SEGMENT + 2)
    got, _lwm = recover_then_power_loss(tmp_path, fs)
    assert got == expected(PER_SEGMENT + 2)


# ``partial``: bytes of the batch that reached the file before the error: none, part of
# the first record, the whole first record and part of the second. ``disk``: a
# preallocated segment (one write fails) or a growing one (every write that would grow
# the file fails until space is freed; the clean-up of the failed write must not need any).
@pytest.mark.parametrize("partial", [0, 30, PAY + 20 + 5])
@pytest.mark.parametrize("then", ["append", "close", "power-loss"])
@pytest.mark.parametrize("disk", ["preallocated", "growing"])
def test_enospc_writing_a_record_leaves_no_trace(
    tmp_path: Path, partial: int, then: str, disk: str
) -> None:
    fs = FaultFs()
    growing = disk == "growing"
    wal = Wal.open(tmp_path, fopts(fs, preallocate=not growing))
    fill(wal, 5)
    times = None if growing else 1
    fs.inject("pwrite", errno.ENOSPC, match=".seg", partial=partial, times=times, growing=growing)
    with pytest.raises(LogFullError):
        wal.append_batch([payload(5), payload(6)])
    assert not wal.poisoned
    assert (wal.next_lsn(), wal.high_water_mark()) == (5, 5)
    assert read_all(wal) == expected(5)
    fs.clear_faults()  # space freed
    if then == "append":
        assert wal.append(payload(5)) == 5
        assert read_all(wal) == expected(6)
        wal.close()
        end = 6
    elif then == "close":
        wal.close()
        end = 5
    else:
        wal._abandon()
        fs.crash()
        end = 5
    got, _lwm = recover_then_power_loss(tmp_path, fs)
    assert got == expected(end)  # no record of the failed batch


def test_eio_writing_a_record_poisons(tmp_path: Path) -> None:
    fs = FaultFs()
    wal = Wal.open(tmp_path, fopts(fs))
    fill(wal, 5)
    fs.inject("pwrite", errno.EIO, match=".seg", partial=7)
    with pytest.raises(LogPoisonedError):
        wal.append(payload(5))
    with pytest.raises(LogPoisonedError):
        wal.append(payload(5))
    wal.close()
    got, _lwm = recover_then_power_loss(tmp_path, fs)
    assert got == expected(5)


# ----------------------------------------------------------------- killed at every step
def kill_at_every_step(
    tmp_path: Path,
    base: Path,
    action: Callable[[Wal], object],
    check: Callable[[list[tuple[int, bytes]], int, bool], None],
    power_loss: bool,
) -> int:
    """Run ``action`` on a copy of ``base``, the process killed at its k-th mutating call
    (then the power cut too, or not), for k = 0, 1, ... until it completes; then
    ``check(records, low water mark, completed)`` on what recovery finds. Returns how
    many kill points there were."""
    for k in range(200):
        case = tmp_path / f"kill-{k}"
        shutil.copytree(base, case)
        fs = FaultFs()
        wal = Wal.open(case, fopts(fs))
        fs.kill_after(k)
        try:
            action(wal)
            completed = True
        except SimulatedCrash:
            completed = False
        wal._abandon()
        if power_loss:
            fs.crash()
        else:
            fs.revive()
        check(*recover_then_power_loss(case, fs), completed)
        shutil.rmtree(case)
        if completed:
            return k
    raise AssertionError("the action never completed")


@pytest.mark.parametrize("power_loss", [True, False], ids=["power-loss", "kill-only"])
def test_killed_at_every_step_of_a_roll_over(tmp_path: Path, power_loss: bool) -> None:
    base = tmp_path / "base"
    with Wal.open(base, fopts()) as wal:
        fill(wal, PER_SEGMENT)
    end = PER_SEGMENT

    def check(got: list[tuple[int, bytes]], lwm: int, completed: bool) -> None:
        if completed:
            assert got == expected(end + 1)
        elif power_loss:
            assert got == expected(end)  # never acknowledged, never synced: gone
        else:
            assert got in (expected(end), expected(end + 1))  # outcome unknown

    action = lambda w: w.append(payload(end))  # noqa: E731
    steps = kill_at_every_step(tmp_path, base, action, check, power_loss)
    # truncate + fsync the old segment, create/write/fsync/rename/fsync-dir the new one,
    # write + fsync the record: every one of them was a kill point.
    assert steps >= 8


@pytest.mark.parametrize("power_loss", [True, False], ids=["power-loss", "kill-only"])
def test_killed_at_every_step_of_a_prune(tmp_path: Path, power_loss: bool) -> None:
    base = tmp_path / "base"
    with Wal.open(base, fopts()) as wal:
        fill(wal, 4 * PER_SEGMENT - 5)  # room left: the next append does not roll
    end, target = 4 * PER_SEGMENT - 5, 3 * PER_SEGMENT + 1

    def check(got: list[tuple[int, bytes]], lwm: int, completed: bool) -> None:
        assert lwm == target if completed else lwm in (0, target)
        first = got[0][0]
        assert first <= lwm
        assert got == expected(end, first)

    action = lambda w: w.set_low_water_mark(target)  # noqa: E731
    steps = kill_at_every_step(tmp_path, base, action, check, power_loss)
    assert steps >= 7  # checkpoint: create, write, fsync, rename, fsync-dir; 3 unlinks


@pytest.mark.parametrize("power_loss", [True, False], ids=["power-loss", "kill-only"])
def test_killed_at_every_step_of_recovery(tmp_path: Path, power_loss: bool) -> None:
    base = tmp_path / "base"
    with Wal.open(base, fopts()) as wal:
        fill(wal, 10)
    seg = base / "00000000000000000000.seg"
    garbage = b"\xa5" * 50
    with open(seg, "r+b") as f:  # a torn tail for recovery to cut
        f.seek(64 + 10 * (PAY + 20))
        f.write(garbage)
    for k in range(100):
        case = tmp_path / f"kill-{k}"
        shutil.copytree(base, case)
        fs = FaultFs()
        fs.kill_after(k)
        try:
            Wal.open(case, fopts(fs)).close()
            completed = True
        except SimulatedCrash:
            completed = False
        if power_loss:
            fs.crash()
        else:
            fs.revive()
        got, _lwm = recover_then_power_loss(case, fs)
        assert got == expected(10)
        copies = [p.read_bytes() for p in (case / "torn").glob("*.bin")]
        assert copies and set(copies) == {garbage}
        shutil.rmtree(case)
        if completed:
            break
    assert k >= 5  # copy aside (create, write, fsync, rename, fsync-dir), zero, fsync


def test_killed_at_every_step_of_creating_a_log(tmp_path: Path) -> None:
    for k in range(100):
        case = tmp_path / f"kill-{k}"
        fs = FaultFs()
        fs.kill_after(k)
        try:
            Wal.open(case, fopts(fs)).close()
            completed = True
        except SimulatedCrash:
            completed = False
        fs.crash()
        got, _lwm = recover_then_power_loss(case, FaultFs())
        assert got == []
        if completed:
            break
    assert k >= 8  # META (5 steps), first segment (5 steps)
