"""``append_batch`` is all or none, across a crash too.

A batch is written in one pwrite, but a write the power or a SIGKILL cut short may leave
its first records whole on disk: recovery kept them (a prefix of an append that was never
acknowledged). Each record but a batch's last now says that more of its batch follows
(the MORE flag of the header), and recovery cuts records whose batch is not all there
with the torn tail."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tests.support.faultfs import FaultFs, SimulatedCrash
from walstore import CorruptLogError, Options, SyncPolicy, Wal
from walstore.format import (
    FLAG_MORE,
    FLAGS_OFFSET,
    RECORD_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
)
from walstore.inspect import dump, snapshot, verify
from walstore.repair import repair
from walstore.segments import segment_path

PAYLOADS = [f"record {i}".encode().ljust(300, b".") for i in range(5)]


def _offsets(directory: Path, first: int) -> list[tuple[int, int]]:
    """(offset, flags) of each record of a segment."""
    raw = Path(segment_path(str(directory), first)).read_bytes()
    out, pos = [], SEGMENT_HEADER_SIZE
    while pos + RECORD_HEADER_SIZE <= len(raw):
        (length,) = struct.unpack_from("<I", raw, pos + 4)
        if raw[pos : pos + RECORD_HEADER_SIZE] == bytes(RECORD_HEADER_SIZE):
            break
        out.append((pos, raw[pos + FLAGS_OFFSET]))
        pos += RECORD_HEADER_SIZE + length
    return out


def _one_record_then_a_batch(directory: Path) -> tuple[list[tuple[int, int]], Path, bytearray]:
    """A log of one record, then a batch of PAYLOADS: its records, its segment, its bytes."""
    with Wal.open(directory) as wal:
        wal.append(b"before")
        wal.append_batch(PAYLOADS)
    path = Path(segment_path(str(directory), 0))
    return _offsets(directory, 0), path, bytearray(path.read_bytes())


def test_every_record_of_a_batch_but_the_last_says_more_follows(tmp_path: Path) -> None:
    with Wal.open(tmp_path / "wal") as wal:
        wal.append(b"alone")
        wal.append_batch(PAYLOADS)
        wal.append(b"after")
    flags = [f for _, f in _offsets(tmp_path / "wal", 0)]
    assert flags == [0, FLAG_MORE, FLAG_MORE, FLAG_MORE, FLAG_MORE, 0, 0]


@pytest.mark.parametrize("lost", [1, 2, 4])
def test_recovery_cuts_a_batch_whose_end_is_missing(tmp_path: Path, lost: int) -> None:
    """The last ``lost`` records of a batch never reached the disk (zeros)."""
    directory = tmp_path / "wal"
    records, path, raw = _one_record_then_a_batch(directory)
    start = records[len(records) - lost][0]
    raw[start : records[-1][0] + RECORD_HEADER_SIZE + 300] = bytes(
        records[-1][0] + RECORD_HEADER_SIZE + 300 - start
    )
    path.write_bytes(bytes(raw))
    snap = snapshot(str(directory))  # offline: as open would see it
    assert snap.next_lsn == 1 and snap.torn_tail is not None
    assert "incomplete batch" in snap.torn_tail.reason
    report = verify(str(directory))
    assert report.ok and report.records == 1, report.problems
    with Wal.open(directory) as wal:
        assert [p for _, p in wal.iter_from(0)] == [b"before"]
        assert wal.next_lsn() == 1
        assert wal.append(b"next") == 1
    torn = sorted((directory / "torn").glob("*.bin"))
    assert len(torn) == 1 and torn[0].name.startswith(f"{path.name}-{records[1][0]}-")
    assert torn[0].read_bytes().startswith(bytes(raw[records[1][0] : records[1][0] + 20]))


def test_a_batch_torn_by_a_power_cut_is_gone_whole(tmp_path: Path) -> None:
    """The batch's pwrite reached the disk only in part: the first records whole."""
    fs = FaultFs()
    opts = Options(sync=SyncPolicy.NONE, min_free_bytes=0, fs=fs)
    wal = Wal.open(tmp_path / "wal", opts)
    wal.append(b"before")
    wal.sync()
    wal.append_batch(PAYLOADS)  # not synced
    wal._abandon()
    fs.crash(keep_writes=1, tear=2 * (RECORD_HEADER_SIZE + 300) + 10)
    with Wal.open(tmp_path / "wal", opts) as wal:
        assert [p for _, p in wal.iter_from(0)] == [b"before"]


def test_a_batch_killed_mid_write_is_gone_whole(tmp_path: Path) -> None:
    """SIGKILL at the pwrite, nobody else attached: the page cache has what landed."""
    fs = FaultFs()
    opts = Options(min_free_bytes=0, fs=fs)
    wal = Wal.open(tmp_path / "wal", opts)
    wal.append(b"before")
    fs.kill_after(1)  # the intent in shm is not a call; the pwrite is the second
    with pytest.raises(SimulatedCrash):
        wal.append_batch(PAYLOADS)
    wal._abandon()
    fs.crash(keep_writes=1, tear=3 * (RECORD_HEADER_SIZE + 300))
    with Wal.open(tmp_path / "wal", opts) as wal:
        got = [p for _, p in wal.iter_from(0)]
    assert got in ([b"before"], [b"before", *PAYLOADS])


def _sealed_log(directory: Path) -> list[tuple[int, int]]:
    with Wal.open(directory, Options(segment_bytes=4160, min_free_bytes=0)) as wal:
        wal.append_batch(PAYLOADS)
        for _ in range(20):
            wal.append(b"x" * 300)
        assert wal.status().segments >= 2
    records = _offsets(directory, 0)
    assert [f for _, f in records][:5] == [FLAG_MORE] * 4 + [0]
    return records


def test_a_sealed_segment_cut_inside_a_batch_is_named_alike_everywhere(tmp_path: Path) -> None:
    """Its end lost after LSN 2, in the middle of a batch: verify, dump and the reader
    give the same segment, offset and reason (an early end: the next segment's first
    LSN says records are missing)."""
    directory = tmp_path / "wal"
    records = _sealed_log(directory)
    sealed = Path(segment_path(str(directory), 0))
    sealed.write_bytes(sealed.read_bytes()[: records[3][0]])
    report = verify(str(directory))
    fatal = [(p.segment, p.offset, p.reason) for p in report.problems if p.fatal]
    assert len(fatal) == 1 and fatal[0][:2] == (sealed.name, records[3][0]), fatal
    assert fatal[0][2].startswith("ends at LSN 3, next segment starts at ")
    with pytest.raises(CorruptLogError) as err:
        list(dump(str(directory)))
    assert (err.value.segment, err.value.offset, err.value.reason) == fatal[0]


@pytest.mark.parametrize("tail", ["zeros", "garbage", "cut mid-record"])
def test_repair_cuts_an_incomplete_batch_as_open_does(tmp_path: Path, tail: str) -> None:
    """The newest segment ends in the first records of a batch: repair cuts them with
    the torn tail, as open would (it kept them, and rewrote them without the flag, so
    the partial batch stayed for good; with zeros after them it did nothing)."""
    directory = tmp_path / "wal"
    records, path, raw = _one_record_then_a_batch(directory)
    last = records[-1][0]
    if tail == "zeros":
        raw[last : last + RECORD_HEADER_SIZE + 300] = bytes(RECORD_HEADER_SIZE + 300)
    elif tail == "garbage":
        raw[last : last + RECORD_HEADER_SIZE + 300] = b"\x5a" * (RECORD_HEADER_SIZE + 300)
    else:
        raw[last + 30 : last + RECORD_HEADER_SIZE + 300] = bytes(RECORD_HEADER_SIZE + 270)
    path.write_bytes(bytes(raw))
    report = repair(str(directory))
    assert report.cut_bytes > 4 * 300, report
    assert report.lost == []
    with Wal.open(directory) as wal:
        assert [p for _, p in wal.iter_from(0)] == [b"before"]
        assert wal.next_lsn() == 1
