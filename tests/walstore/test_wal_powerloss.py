"""Simulated power loss, property-based: a hypothesis state machine appends, syncs, moves
the low water mark, kills the process (at any mutating call), cuts the power (dropping
every unsynced byte, or keeping an ordered prefix of the unsynced writes, the last one
torn) and reopens, against a model of the log. After every recovery: every acknowledged
record at or above the low water mark is there with its payload, the log is a prefix of
what was written (contiguous LSNs, nothing else, no duplicates) that ends between two
appends (a batch is there whole or not at all), and the low water mark never went back.
Also the fault layer's own tests (``faultfs.FaultFs``)."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from tests.support.faultfs import FaultFs, SimulatedCrash
from walstore import Options, SyncPolicy, Wal, WalError

pytestmark = pytest.mark.timeout(180)

SIZES = st.lists(st.integers(0, 1500) | st.just(9000), min_size=1, max_size=4)
KEEP = st.integers(0, 12)  # unsynced writes that reached the disk anyway, in order
TEAR = st.none() | st.integers(0, 300)  # bytes of the last kept write that did
KEEP_DIRS = st.integers(0, 3)  # likewise for unsynced directory operations


class PowerLoss(RuleBasedStateMachine):
    """The model: ``written[lsn]`` is every payload that may be in the log; the first
    ``acked`` are acknowledged (durable); the persisted low water mark lies in
    [``lwm``, ``lwm_max``] (a set_low_water_mark cut short may or may not have landed)."""

    policy = SyncPolicy.ALWAYS

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="wal-powerloss-")
        self.fs = FaultFs()
        self.opts = Options()
        self.wal: Wal | None = None
        self.written: list[bytes] = []
        self.acked = 0
        self.bounds = {0}  # where one append ends: the log may end only there
        self.lwm = self.lwm_max = 0
        self.generation = 0  # payloads differ when a lost LSN is written again

    @initialize(segment_bytes=st.integers(4160, 8192), preallocate=st.booleans())
    def open_log(self, segment_bytes: int, preallocate: bool) -> None:
        self.opts = Options(
            segment_bytes=segment_bytes,
            preallocate=preallocate,
            sync=self.policy,
            min_free_bytes=0,
            fs=self.fs,
        )
        self.wal = Wal.open(self.dir, self.opts)

    def teardown(self) -> None:
        if self.wal is not None:
            try:
                self.wal.close()
            except WalError:
                self.wal._abandon()
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def log(self) -> Wal:
        assert self.wal is not None
        return self.wal

    def payloads(self, sizes: list[int]) -> list[bytes]:
        self.generation += 1
        start = len(self.written)
        out = []
        for i, size in enumerate(sizes):
            head = f"{start + i}.{self.generation}|".encode()
            out.append(head + bytes([(start + i) % 251]) * max(0, size - len(head)))
        return out

    # ------------------------------------------------------------- operations
    def _append(self, batch: list[bytes], single: bool) -> None:
        start = len(self.written)
        self.written.extend(batch)  # from here on they may be in the log
        self.bounds.add(len(self.written))
        if single:
            assert self.log.append(batch[0]) == start
        else:
            assert self.log.append_batch(batch) == range(start, start + len(batch))
        if self.policy is SyncPolicy.ALWAYS:
            self.acked = len(self.written)
        assert self.log.next_lsn() == len(self.written)

    def _set_lwm(self, target: int) -> None:
        self.lwm_max = max(self.lwm_max, target)
        self.log.set_low_water_mark(target)
        self.lwm = max(self.lwm, target)
        assert self.log.low_water_mark() == self.lwm

    @rule(sizes=SIZES, single=st.booleans())
    def append(self, sizes: list[int], single: bool) -> None:
        self._append(self.payloads(sizes[:1] if single else sizes), single)

    @rule(batches=st.lists(SIZES, min_size=2, max_size=8))
    def append_several(self, batches: list[list[int]]) -> None:
        for sizes in batches:  # longer logs: more roll-overs and prunes
            self._append(self.payloads(sizes), single=False)

    @rule()
    def sync(self) -> None:
        assert self.log.sync() == len(self.written)
        self.acked = len(self.written)

    @rule(data=st.data())
    def set_low_water_mark(self, data: st.DataObject) -> None:
        self._set_lwm(data.draw(st.integers(self.lwm, self.acked), label="lwm"))

    @rule()
    def close_and_reopen(self) -> None:
        self.log.close()
        self.acked = len(self.written)  # close flushes everything written
        self.reopen()

    @rule(keep=KEEP, tear=TEAR, dirs=KEEP_DIRS)
    def power_loss(self, keep: int, tear: int | None, dirs: int) -> None:
        self.log._abandon()
        self.fs.crash(keep_writes=keep, tear=tear, keep_dir_ops=dirs)
        self.reopen()

    @rule(
        op=st.sampled_from(["append", "set_low_water_mark", "sync", "recovery"]),
        at=st.integers(0, 14),
        sizes=SIZES,
        data=st.data(),
        power=st.booleans(),
        keep=KEEP,
        tear=TEAR,
        dirs=KEEP_DIRS,
    )
    def killed_mid_operation(
        self,
        op: str,
        at: int,
        sizes: list[int],
        data: st.DataObject,
        power: bool,
        keep: int,
        tear: int | None,
        dirs: int,
    ) -> None:
        """The process dies at its ``at``-th mutating call inside ``op``; then, if
        ``power``, the power goes too (else the page cache keeps what it had)."""
        if op == "recovery":
            self.log._abandon()
            self.fs.crash(keep_writes=keep, tear=tear)
            self.wal = None
        target = data.draw(st.integers(self.lwm, self.acked), label="lwm")
        self.fs.kill_after(at)
        try:
            if op == "append":
                self._append(self.payloads(sizes), single=False)
            elif op == "set_low_water_mark":
                self._set_lwm(target)
            elif op == "sync":
                self.sync()
            else:
                self.wal = Wal.open(self.dir, self.opts)
        except SimulatedCrash:
            pass
        if self.wal is not None:
            self.log._abandon()
        if power:
            self.fs.crash(keep_writes=keep, tear=tear, keep_dir_ops=dirs)
        else:
            self.fs.revive()
        self.reopen()

    # ------------------------------------------------------------- checks
    def reopen(self) -> None:
        self.wal = Wal.open(self.dir, self.opts)
        lwm = self.log.low_water_mark()
        assert self.lwm <= lwm <= self.lwm_max, (self.lwm, lwm, self.lwm_max)
        first = self.log.first_lsn()
        assert first <= lwm  # nothing at or above the low water mark was pruned
        records = list(self.log.iter_from(first))
        end = first + len(records)
        assert [lsn for lsn, _ in records] == list(range(first, end))
        assert self.acked <= end <= len(self.written), (self.acked, end, len(self.written))
        assert [data for _, data in records] == self.written[first:end]
        assert end in self.bounds, f"the log ends at LSN {end}, inside a batch"
        assert self.log.next_lsn() == self.log.high_water_mark() == end
        # What recovery found is durable now: it is the new truth.
        del self.written[end:]
        self.bounds = {b for b in self.bounds if b <= end}
        self.acked = end
        self.lwm = self.lwm_max = lwm

    @invariant()
    def marks_are_ordered(self) -> None:
        if self.wal is not None:
            wal = self.wal
            assert wal.first_lsn() <= wal.low_water_mark() <= wal.high_water_mark()
            assert wal.high_water_mark() <= wal.next_lsn() == len(self.written)


class PowerLossSyncNone(PowerLoss):
    """SyncPolicy.NONE: an explicit ``sync()`` (or close) is what acknowledges."""

    policy = SyncPolicy.NONE


SETTINGS = settings(max_examples=150, stateful_step_count=30, deadline=None)
TestPowerLossSyncAlways = PowerLoss.TestCase
TestPowerLossSyncAlways.settings = SETTINGS
TestPowerLossSyncNone = PowerLossSyncNone.TestCase
TestPowerLossSyncNone.settings = SETTINGS


# ----------------------------------------------------------------- the fault layer itself
def _write(fs: FaultFs, path: Path, data: bytes, offset: int = 0, sync: bool = False) -> None:
    fd = fs.open(str(path), os.O_RDWR | os.O_CREAT)
    try:
        fs.pwrite(fd, data, offset)
        if sync:
            fs.fdatasync(fd)
    finally:
        fs.close(fd)


@pytest.mark.timeout(10)
def test_faultfs_drops_unsynced_writes_only(tmp_path: Path) -> None:
    fs = FaultFs()
    path = tmp_path / "f"
    _write(fs, path, b"durable", sync=True)
    fs.fsync_dir(str(tmp_path))
    _write(fs, path, b"XY", offset=2)
    _write(fs, path, b"tail", offset=7)
    assert path.read_bytes() == b"duXYbletail"  # the page cache sees everything
    fs.crash()
    assert path.read_bytes() == b"durable"


@pytest.mark.timeout(10)
def test_faultfs_keeps_an_ordered_prefix_and_tears_the_last(tmp_path: Path) -> None:
    fs = FaultFs()
    path = tmp_path / "f"
    _write(fs, path, b"", sync=True)
    fs.fsync_dir(str(tmp_path))
    for i, chunk in enumerate([b"aaaa", b"bbbb", b"cccc"]):
        _write(fs, path, chunk, offset=4 * i)
    assert fs.unsynced_writes == 3
    fs.crash(keep_writes=2, tear=1)
    assert path.read_bytes() == b"aaaab"


@pytest.mark.timeout(10)
def test_faultfs_undoes_unsynced_directory_operations(tmp_path: Path) -> None:
    fs = FaultFs()
    d = str(tmp_path)
    for name in ("old", "gone", "tmp", "doomed"):
        _write(fs, tmp_path / name, name.encode(), sync=True)
    fs.fsync_dir(d)
    fs.write_file_atomic(d, "old", b"replaced")  # rename + directory fsync: durable
    _write(fs, tmp_path / "new", b"new", sync=True)  # data synced, directory entry not
    fs.rename(str(tmp_path / "tmp"), str(tmp_path / "gone"))  # replaces a file, unsynced
    fs.unlink(str(tmp_path / "doomed"))
    assert sorted(os.listdir(d)) == ["gone", "new", "old"]
    assert fs.unsynced_dir_ops == 3
    fs.crash()
    assert sorted(os.listdir(d)) == ["doomed", "gone", "old", "tmp"]
    contents = {name: (tmp_path / name).read_bytes() for name in os.listdir(d)}
    assert contents == {"doomed": b"doomed", "gone": b"gone", "old": b"replaced", "tmp": b"tmp"}


@pytest.mark.timeout(10)
def test_faultfs_injects_errors_and_kills(tmp_path: Path) -> None:
    fs = FaultFs()
    path = tmp_path / "f"
    fs.inject("fdatasync", errno.EIO, skip=1)
    _write(fs, path, b"one", sync=True)  # the first matching call passes
    fs.fsync_dir(str(tmp_path))
    with pytest.raises(OSError) as info:
        _write(fs, path, b"two", sync=True)
    assert info.value.errno == errno.EIO
    assert fs.unsynced_writes == 1  # a failed fsync made nothing durable
    fs.inject("pwrite", errno.ENOSPC, match="f", partial=2)
    with pytest.raises(OSError) as info:
        _write(fs, path, b"three", offset=3)
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"twoth"
    fs.kill_after(1)
    fd = fs.open(str(path), os.O_RDWR)
    fs.pwrite(fd, b"!", 0)
    with pytest.raises(SimulatedCrash):
        fs.fdatasync(fd)
    with pytest.raises(SimulatedCrash):  # dead: nothing else reaches the disk
        fs.pwrite(fd, b"?", 0)
    fs.close(fd)
    fs.crash()
    assert not fs.dead
    assert path.read_bytes() == b"one"
