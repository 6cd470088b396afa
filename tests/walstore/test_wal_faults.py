"""The fault matrix of the log anchors (etcd ``repair_test.go``, RocksDB ``log_test.cc``),
on-disk half: each case damages a closed log the way a crash or a bad disk would, and
asserts what EVERY reader makes of the same bytes (``assert_readers``): ``walstore
verify``, ``status``, ``dump`` (the CLI, and the ``inspect`` functions the metrics and the
local stack use), then ``Wal.open`` and the pump's ``Reader``: exactly which LSNs survive,
or which CorruptLogError (segment, offset, reason) is raised. Injected I/O errors and kill
points are in ``test_wal_io_faults.py``."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from walstore import CorruptLogError, Options, SyncPolicy, Wal
from walstore.cli import main as cli_main
from walstore.format import RECORD_HEADER, SEGMENT_HEADER_SIZE, unpack_segment_header
from walstore.inspect import dump, snapshot, verify

pytestmark = pytest.mark.timeout(60)

SEG = 4160
PAY = 100  # payload bytes: 120-byte records


def opts(**kw: Any) -> Options:
    base: dict[str, Any] = {
        "segment_bytes": SEG,
        "preallocate": True,
        "min_free_bytes": 0,
        "sync": SyncPolicy.NONE,  # building and reading only; close() flushes
    }
    base.update(kw)
    return Options(**base)


def payload(lsn: int, size: int = PAY) -> bytes:
    head = f"rec-{lsn}:".encode()
    return head + bytes([1 + lsn % 250]) * max(0, size - len(head))


def build(path: Path, count: int, size: int = PAY, **kw: Any) -> list[bytes]:
    pays = [payload(i, size) for i in range(count)]
    with Wal.open(path, opts(**kw)) as wal:
        for p in pays:
            wal.append(p)
    return pays


def read_all(wal: Wal) -> list[tuple[int, bytes]]:
    return [(lsn, data) for lsn, data in wal.iter_from(wal.first_lsn())]


def survivors(path: Path, **kw: Any) -> list[tuple[int, bytes]]:
    with Wal.open(path, opts(**kw)) as wal:
        return read_all(wal)


def expected(pays: list[bytes], stop: int) -> list[tuple[int, bytes]]:
    return [(i, pays[i]) for i in range(stop)]


def segs(path: Path) -> list[Path]:
    return sorted(path.glob("*.seg"))


def layout(seg: Path) -> list[tuple[int, int, int]]:
    """(lsn, start, end) of each record in an undamaged segment."""
    raw = seg.read_bytes()
    lsn = unpack_segment_header(raw[:SEGMENT_HEADER_SIZE]).first_lsn
    out, pos = [], SEGMENT_HEADER_SIZE
    while pos + RECORD_HEADER.size <= len(raw):
        _crc, length, rlsn, rtype = RECORD_HEADER.unpack_from(raw, pos)
        if rtype == 0 or rlsn != lsn:
            break
        out.append((lsn, pos, pos + RECORD_HEADER.size + length))
        pos, lsn = pos + RECORD_HEADER.size + length, lsn + 1
    return out


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def flip(path: Path, offset: int, bit: int = 0) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


def torn_files(path: Path) -> list[Path]:
    return sorted((path / "torn").glob("*.bin")) if (path / "torn").exists() else []


def files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def assert_refused(path: Path, segment: str, offset: int, reason: str) -> CorruptLogError:
    """Open refuses with exactly this error and changes nothing on disk."""
    before = {k: v for k, v in files(path).items() if k != "shm"}
    with pytest.raises(CorruptLogError) as info:
        Wal.open(path, opts())
    err = info.value
    assert (err.segment, err.offset) == (segment, offset), str(err)
    assert err.reason.startswith(reason), err.reason
    assert {k: v for k, v in files(path).items() if k != "shm"} == before
    assert torn_files(path) == []
    return err


def assert_torn(path: Path, seg: Path, offset: int, cut: bytes) -> None:
    """One torn-tail copy, named after the segment and offset, holding ``cut``."""
    torn = torn_files(path)
    assert [p.read_bytes() for p in torn] == [cut]
    assert torn[0].name.startswith(f"{seg.name}-{offset}-")
    assert (torn[0].stat().st_mode & 0o777, (path / "torn").stat().st_mode & 0o777) == (
        0o600,
        0o700,
    )


# ----------------------------------------------------------------- every reader
@dataclass(frozen=True)
class Verdict:
    """What every reader must make of a damaged log.

    ``kind``: "clean" (nothing wrong), "torn" (a torn tail: reported by the read-only
    commands, cut by open), "refused" (open refuses; so does every read-only command) or
    "sealed" (damage in a sealed segment's records: open checks headers only and opens;
    the reader, dump and verify stop at the damage). ``records``: what a reader shows
    (for "sealed", the records before the damage); ``end``: the next LSN status reports."""

    kind: str
    records: list[tuple[int, bytes]]
    end: int = -1
    segment: str = ""
    offset: int = 0
    reason: str = ""

    @property
    def where(self) -> str:
        return f"segment {self.segment} offset {self.offset}"


def run_cli(*args: str) -> tuple[int, str, str]:
    """``walstore ARGS`` in this process (the code the console script runs)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli_main(list(args))
    return code, out.getvalue(), err.getvalue()


def dumped(stdout: str) -> list[tuple[int, bytes]]:
    rows = [json.loads(line) for line in stdout.splitlines()]
    return [
        (d["lsn"], d["payload"].encode() if d["payload"] is not None else bytes.fromhex(
            d["payload_hex"]))
        for d in rows
    ]  # fmt: skip


def assert_readers(path: Path, v: Verdict) -> None:
    """Every reader gives verdict ``v`` on the bytes in ``path``. The read-only ones run
    first and must change nothing; then open and the reader (open may cut a torn tail)."""
    before = {k: b for k, b in files(path).items() if k != "shm"}
    end = v.end if v.end >= 0 else (v.records[-1][0] + 1 if v.records else 0)
    fatal = v.kind in ("refused", "sealed")

    report = verify(str(path))
    code, _out, err = run_cli("verify", str(path))
    problems = [(p.segment, p.offset, p.fatal) for p in report.problems]
    if v.kind == "clean":
        assert (report.ok, problems, code) == (True, [], 0), (problems, err)
    elif v.kind == "torn":
        assert (report.ok, problems, code) == (True, [(v.segment, v.offset, False)], 0)
        assert v.where in err and "torn tail" in err, err
    else:
        assert (report.ok, problems[0], code) == (False, (v.segment, v.offset, True), 1)
        assert v.where in err, err

    code, out, err = run_cli("status", str(path), "--json")
    if v.kind == "refused":
        assert code == 2 and out == "" and v.where in err, (code, out, err)
        with pytest.raises(CorruptLogError) as info:
            snapshot(str(path))
        assert (info.value.segment, info.value.offset) == (v.segment, v.offset)
        assert info.value.reason.startswith(v.reason), info.value.reason
    else:
        doc = json.loads(out)
        assert code == 0 and (doc["next_lsn"], doc["high_water_mark"]) == (end, end), (doc, err)
        assert snapshot(str(path)).next_lsn == end
        if v.kind == "torn":
            assert v.where in err and "torn tail" in err, err
        else:
            assert err == ""

    code, out, err = run_cli("dump", str(path), "--json")
    if fatal:
        assert code == 2 and v.where in err, (code, err)
        assert dumped(out) == (v.records if v.kind == "sealed" else [])
        with pytest.raises(CorruptLogError) as info:
            list(dump(str(path)))
        assert (info.value.segment, info.value.offset) == (v.segment, v.offset)
    else:
        assert code == 0 and dumped(out) == v.records, (code, err)
        assert list(dump(str(path))) == v.records
        assert (v.where in err and "torn tail" in err) if v.kind == "torn" else err == ""

    assert {k: b for k, b in files(path).items() if k != "shm"} == before, "a reader wrote"
    assert torn_files(path) == []

    if v.kind == "refused":
        assert_refused(path, v.segment, v.offset, v.reason)
        return
    with Wal.open(path, opts()) as wal:
        assert wal.next_lsn() == wal.high_water_mark() == end
        reader, got = wal.reader(wal.first_lsn()), []
        try:
            if v.kind == "sealed":
                with pytest.raises(CorruptLogError) as info:
                    for _ in range(1000):
                        got += reader.read(7)
                assert (info.value.segment, info.value.offset) == (v.segment, v.offset)
                assert info.value.reason.startswith(v.reason), info.value.reason
            else:
                for _ in range(1000):
                    batch = reader.read(7)
                    if not batch:
                        break
                    got += batch
        finally:
            reader.close()
        assert got == v.records


# ----------------------------------------------------------------- torn last record
@pytest.mark.parametrize("preallocate", [False, True], ids=["file-cut", "tail-zeroed"])
def test_last_record_torn_at_every_byte_offset(tmp_path: Path, preallocate: bool) -> None:
    base = tmp_path / "base"
    pays = build(base, 100, size=24, preallocate=preallocate)  # two segments
    seg = segs(base)[-1]
    lsn, start, end = layout(seg)[-1]
    assert (lsn, len(segs(base))) == (99, 2)
    original = seg.read_bytes()
    for cut in range(start, end):
        case = tmp_path / f"cut-{cut}"
        shutil.copytree(base, case)
        damaged = case / seg.name
        if preallocate:  # the write reached the disk up to ``cut``; zeros after it
            patch(damaged, cut, bytes(end - cut))
        else:  # the file ends at ``cut``
            os.truncate(damaged, cut)
        kept = original[start:cut].rstrip(b"\0")
        if kept:
            verdict = Verdict("torn", expected(pays, 99), segment=seg.name, offset=start)
        else:
            verdict = Verdict("clean", expected(pays, 99))
        assert_readers(case, verdict)
        with Wal.open(case, opts(preallocate=preallocate)) as wal:
            assert read_all(wal) == expected(pays, 99), f"cut at {cut}"
            assert wal.next_lsn() == wal.high_water_mark() == 99
            assert wal.append(b"again") == 99
        if kept:
            assert_torn(case, damaged, start, kept)
        else:
            assert torn_files(case) == [], f"cut at {cut}"
        assert survivors(case)[-2:] == [(98, pays[98]), (99, b"again")]
        assert verify(str(case)).ok
        shutil.rmtree(case)


# ----------------------------------------------------------------- zeroed sectors
def test_zeroed_sector_in_the_tail_is_cut(tmp_path: Path) -> None:
    pays = build(tmp_path, 20)  # one preallocated segment, data up to 64 + 20 * 120
    seg = segs(tmp_path)[0]
    sector = 2048
    lsn, start, _end = next(r for r in layout(seg) if r[2] > sector)
    original = seg.read_bytes()
    patch(seg, sector, bytes(512))
    assert_readers(tmp_path, Verdict("torn", expected(pays, lsn), segment=seg.name, offset=start))
    assert survivors(tmp_path) == expected(pays, lsn)
    assert_torn(tmp_path, seg, start, original[start:sector])
    assert seg.read_bytes()[start:] == bytes(SEG - start)  # cut back to zeros


def test_zeroed_sector_in_the_middle_of_the_active_segment_refuses_open(tmp_path: Path) -> None:
    build(tmp_path, 20)
    seg = segs(tmp_path)[0]
    records = layout(seg)
    _lsn, start, _end = next(r for r in records if r[2] > 512)
    next_lsn, next_start, _ = next(r for r in records if r[1] >= 1024)
    patch(seg, 512, bytes(512))
    assert_readers(tmp_path, Verdict("refused", [], 0, seg.name, start, "record checksum mismatch"))
    err = assert_refused(tmp_path, seg.name, start, "record checksum mismatch")
    assert f"a valid record (LSN {next_lsn}) follows at offset {next_start}" in err.reason
    report = verify(str(tmp_path))
    assert [(p.segment, p.offset, p.fatal) for p in report.problems] == [(seg.name, start, True)]


def test_zeroed_sector_in_a_sealed_segment_is_found_by_readers(tmp_path: Path) -> None:
    # Open checks sealed segments from their headers only (no full scan at open); the
    # reader and verify find the damage, with segment and offset.
    pays = build(tmp_path, 60)
    first = segs(tmp_path)[0]
    lsn, start, _end = next(r for r in layout(first) if r[2] > 512)
    patch(first, 512, bytes(512))
    assert_readers(
        tmp_path, Verdict("sealed", expected(pays, lsn), 60, first.name, start, "record")
    )
    with Wal.open(tmp_path, opts()) as wal:
        reader = wal.reader(0)
        got = []
        with pytest.raises(CorruptLogError) as info:
            for _ in range(100):
                got += reader.read(1)
        reader.close()
    assert got == expected(pays, lsn)
    assert (info.value.segment, info.value.offset) == (first.name, start)
    report = verify(str(tmp_path))
    assert [(p.segment, p.offset, p.fatal) for p in report.problems] == [(first.name, start, True)]


def test_hole_in_the_newest_of_several_segments_is_corruption_for_every_reader(
    tmp_path: Path,
) -> None:
    """The review's case: 512 zeroed bytes in the middle of the newest segment, valid
    records after them. No reader may present the records before the hole as the log."""
    build(tmp_path, 80)  # three segments
    seg = segs(tmp_path)[-1]
    records = layout(seg)
    assert len(segs(tmp_path)) == 3 and len(records) > 8
    _lsn, start, _end = next(r for r in records if r[2] > 600)
    next_lsn, next_start, _ = next(r for r in records if r[1] >= 1112)
    patch(seg, 600, bytes(512))
    assert_readers(tmp_path, Verdict("refused", [], 0, seg.name, start, "record checksum mismatch"))
    err = assert_refused(tmp_path, seg.name, start, "record checksum mismatch")
    assert f"a valid record (LSN {next_lsn}) follows at offset {next_start}" in err.reason


def test_zeroed_records_at_a_record_boundary_of_a_sealed_segment(tmp_path: Path) -> None:
    """Zeros where a record header should be look like the end of the data: in a sealed
    segment that is damage, named at its offset (not at offset 0)."""
    pays = build(tmp_path, 60)
    first = segs(tmp_path)[0]
    lsn, start, _ = layout(first)[5]
    _, _, end = layout(first)[6]
    patch(first, start, bytes(end - start))  # records 5 and 6 zeroed
    reason = f"LSN 0 where {lsn} was expected"
    assert_readers(tmp_path, Verdict("sealed", expected(pays, lsn), 60, first.name, start, reason))


# ----------------------------------------------------------------- flipped bits
FIELDS = {  # field of the last record -> (byte offset in the record, bit)
    "crc": (0, 3),
    "length": (4, 0),
    "lsn": (8, 1),
    "type": (16, 2),
    "payload": (60, 5),
}


@pytest.mark.parametrize("field", sorted(FIELDS))
def test_bit_flip_in_the_tail_record_is_cut(tmp_path: Path, field: str) -> None:
    pays = build(tmp_path, 50)
    seg = segs(tmp_path)[-1]
    lsn, start, end = layout(seg)[-1]
    where, bit = FIELDS[field]
    flip(seg, start + where, bit)
    damaged = seg.read_bytes()[start:end]
    assert_readers(tmp_path, Verdict("torn", expected(pays, lsn), segment=seg.name, offset=start))
    assert survivors(tmp_path) == expected(pays, lsn)
    assert_torn(tmp_path, seg, start, damaged)


@pytest.mark.parametrize("field", sorted(FIELDS))
def test_bit_flip_mid_active_segment_refuses_open(tmp_path: Path, field: str) -> None:
    build(tmp_path, 50)
    seg = segs(tmp_path)[-1]
    records = layout(seg)
    lsn, start, _end = records[3]
    where, bit = FIELDS[field]
    flip(seg, start + where, bit)
    reason = {
        "crc": "record checksum mismatch",
        "length": "record checksum mismatch",  # one byte longer: the checksum fails
        "lsn": f"LSN {lsn ^ 2} where {lsn} was expected",
        "type": "unknown record type 5",
        "payload": "record checksum mismatch",
    }[field]
    assert_readers(tmp_path, Verdict("refused", [], 0, seg.name, start, reason))
    err = assert_refused(tmp_path, seg.name, start, reason)
    assert f"a valid record (LSN {lsn + 1}) follows at offset {records[4][1]}" in err.reason


def test_bit_flip_in_a_sealed_segment_is_found_by_readers(tmp_path: Path) -> None:
    pays = build(tmp_path, 60)
    first = segs(tmp_path)[0]
    lsn, start, _end = layout(first)[10]
    flip(first, start + 50)
    assert_readers(
        tmp_path,
        Verdict("sealed", expected(pays, lsn), 60, first.name, start, "record checksum mismatch"),
    )
    with Wal.open(tmp_path, opts()) as wal:
        reader = wal.reader(0)
        assert reader.read(lsn) == expected(pays, lsn)  # below the damage: fine
        reader.close()
        with pytest.raises(CorruptLogError) as info:
            list(wal.iter_from(lsn))
    assert (info.value.segment, info.value.offset) == (first.name, start)
    assert info.value.reason == "record checksum mismatch"
    assert not verify(str(tmp_path)).ok


def test_bit_flip_in_a_segment_header_refuses_open(tmp_path: Path) -> None:
    build(tmp_path, 60)
    first = segs(tmp_path)[0]
    flip(first, 20)  # inside the first-LSN field
    assert_readers(
        tmp_path, Verdict("refused", [], 0, first.name, 0, "segment header checksum mismatch")
    )
    assert_refused(tmp_path, first.name, 0, "segment header checksum mismatch")


# ----------------------------------------------------------------- garbage, bad lengths
def test_garbage_after_the_last_record_is_cut(tmp_path: Path) -> None:
    pays = build(tmp_path, 10)
    seg = segs(tmp_path)[0]
    _lsn, _start, end = layout(seg)[-1]
    garbage = bytes(range(1, 200))
    patch(seg, end, garbage)
    assert_readers(tmp_path, Verdict("torn", expected(pays, 10), segment=seg.name, offset=end))
    assert survivors(tmp_path) == expected(pays, 10)
    assert_torn(tmp_path, seg, end, garbage)


@pytest.mark.parametrize(
    "length", [0xFFFFFFFF, 64 * 1024 * 1024 + 1, SEG], ids=["max", "over-limit", "past-eof"]
)
def test_bad_length_at_the_end_is_cut(tmp_path: Path, length: int) -> None:
    pays = build(tmp_path, 10)
    seg = segs(tmp_path)[0]
    _lsn, _start, end = layout(seg)[-1]
    header = RECORD_HEADER.pack(0x12345678, length, 10, 1)  # the expected next LSN
    patch(seg, end, header)
    assert_readers(tmp_path, Verdict("torn", expected(pays, 10), segment=seg.name, offset=end))
    assert survivors(tmp_path) == expected(pays, 10)
    assert_torn(tmp_path, seg, end, header.rstrip(b"\0"))
    with Wal.open(tmp_path, opts()) as wal:
        assert wal.append(b"x") == 10


def test_bad_length_in_the_middle_refuses_open(tmp_path: Path) -> None:
    build(tmp_path, 10)
    seg = segs(tmp_path)[0]
    records = layout(seg)
    _lsn, start, _end = records[4]
    patch(seg, start + 4, struct.pack("<I", 2**31))
    reason = f"record length {2**31} exceeds the limit {64 * 1024 * 1024}"
    assert_readers(tmp_path, Verdict("refused", [], 0, seg.name, start, reason))
    err = assert_refused(tmp_path, seg.name, start, reason)
    assert f"(LSN 5) follows at offset {records[5][1]}" in err.reason


# ----------------------------------------------------------------- missing files
def test_missing_middle_segment_refuses_open(tmp_path: Path) -> None:
    build(tmp_path, 130)
    names = [p.name for p in segs(tmp_path)]
    assert len(names) >= 4
    (tmp_path / names[1]).unlink()
    reason = f"gap in the segment sequence: previous segment is {names[1]}, found {names[0]}"
    assert_readers(tmp_path, Verdict("refused", [], 0, names[2], 0, reason))
    assert_refused(tmp_path, names[2], 0, reason)


def test_missing_first_segment_refuses_open(tmp_path: Path) -> None:
    build(tmp_path, 70)
    names = [p.name for p in segs(tmp_path)]
    (tmp_path / names[0]).unlink()
    reason = "segments before it are missing (low water mark 0)"
    assert_readers(tmp_path, Verdict("refused", [], 0, names[1], 0, reason))
    assert_refused(tmp_path, names[1], 0, reason)


def test_missing_meta_refuses_open_and_keeps_the_log(tmp_path: Path) -> None:
    build(tmp_path, 5)
    (tmp_path / "META").unlink()
    assert_readers(tmp_path, Verdict("refused", [], 0, "META", 0, "META is missing"))
    assert_refused(tmp_path, "META", 0, "META is missing")
    assert not (tmp_path / "META").exists()


def test_corrupt_checkpoint_refuses_open(tmp_path: Path) -> None:
    pays = build(tmp_path, 70)
    with Wal.open(tmp_path, opts()) as wal:
        wal.set_low_water_mark(40)
    flip(tmp_path / "CHECKPOINT", 2)
    reason = "checkpoint checksum mismatch"
    assert_readers(tmp_path, Verdict("refused", [], 0, "CHECKPOINT", 0, reason))
    assert_refused(tmp_path, "CHECKPOINT", 0, reason)
    flip(tmp_path / "CHECKPOINT", 2)
    assert survivors(tmp_path)[-1] == (69, pays[69])


def test_leftover_temp_files_of_a_crashed_roll_over_are_removed(tmp_path: Path) -> None:
    pays = build(tmp_path, 20)
    # What a roll-over killed before its rename leaves: a half-written next segment.
    (tmp_path / "00000000000000000020.seg.tmp").write_bytes(b"WALSEG\0\x01" + bytes(900))
    (tmp_path / "CHECKPOINT.4242.tmp").write_bytes(b"\1" * 16)
    assert_readers(tmp_path, Verdict("clean", expected(pays, 20)))
    with Wal.open(tmp_path, opts()) as wal:
        assert read_all(wal) == expected(pays, 20)
        assert wal.low_water_mark() == 0
        assert wal.append(b"next") == 20
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []
    assert [p.name for p in segs(tmp_path)] == ["00000000000000000000.seg"]
    assert survivors(tmp_path)[-1] == (20, b"next")


def test_zeroed_meta_refuses_every_reader_and_repair_rebuilds_it(tmp_path: Path) -> None:
    pays = build(tmp_path, 100)  # four segments
    with Wal.open(tmp_path, opts()) as wal:
        wal_id = wal.wal_id
        wal.set_low_water_mark(70)  # prunes the first two segments
        first = wal.first_lsn()
    assert 0 < first < 70
    meta = tmp_path / "META"
    meta.write_bytes(bytes(len(meta.read_bytes())))
    reason = "unreadable META"
    assert_readers(tmp_path, Verdict("refused", [], 0, "META", 0, reason))

    code, out, err = run_cli("repair", str(tmp_path))
    assert code == 0, err
    assert f"rebuilt META from the segment headers (WAL id {wal_id})" in out
    assert f"low water mark lowered from 70 to {first}" in out  # conservative: redeliver
    assert_readers(tmp_path, Verdict("clean", expected(pays, 100)[first:]))
    with Wal.open(tmp_path, opts()) as wal:
        assert (wal.wal_id, wal.low_water_mark(), wal.first_lsn()) == (wal_id, first, first)
        assert wal.append(b"after") == 100
    assert stat_mode(meta) == 0o600


def test_repair_refuses_to_guess_meta_when_segments_disagree(tmp_path: Path) -> None:
    build(tmp_path / "a", 70)
    build(tmp_path / "b", 70)
    newest = segs(tmp_path / "b")[-1]
    shutil.copy(newest, tmp_path / "a" / newest.name)  # a segment of another log
    (tmp_path / "a" / "META").write_bytes(b"\0" * 60)
    code, _out, err = run_cli("repair", str(tmp_path / "a"))
    assert code == 2
    assert "segments name 2 different WAL ids" in err
    assert (tmp_path / "a" / "META").read_bytes() == b"\0" * 60  # nothing guessed


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_repair_never_invents_meta_for_a_directory_without_segments(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a log")
    code, _out, err = run_cli("repair", str(tmp_path))
    assert code == 2 and "META is missing" in err and "no segment header" in err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]  # nothing created there


def test_two_cuts_in_the_same_second_keep_both_copies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torn/ names carried a 1-second timestamp: a second cut at the same segment and
    offset in the same second replaced the first copy. The clock is frozen here."""
    monkeypatch.setattr("time.strftime", lambda *_args: "20240101T000000")
    pays = build(tmp_path, 10)
    seg = segs(tmp_path)[0]
    _lsn, _start, end = layout(seg)[-1]
    cuts = [b"\x01" * 30, b"\x02" * 40]
    for garbage in cuts:
        patch(seg, end, garbage)
        assert survivors(tmp_path) == expected(pays, 10)
    torn = torn_files(tmp_path)
    assert sorted(p.read_bytes() for p in torn) == cuts
    assert all(p.name.startswith(f"{seg.name}-{end}-") for p in torn)


def test_two_repairs_in_the_same_second_keep_both_originals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("time.strftime", lambda *_args: "repair-20240101T000000")
    build(tmp_path, 70)
    first = segs(tmp_path)[0]
    originals = []
    for record in (3, 7):
        _lsn, start, _end = layout(first)[record]
        flip(first, start + 50)
        originals.append(first.read_bytes())
        assert run_cli("repair", str(tmp_path))[0] == 0
    backups = sorted(tmp_path.glob("repair-*"))
    assert len(backups) == 2
    assert sorted((b / first.name).read_bytes() for b in backups) == sorted(originals)
    assert all(stat_mode(b) == 0o700 for b in backups)


def test_repair_of_an_unreadable_newest_header_never_reuses_its_lsns(tmp_path: Path) -> None:
    """Without the header's salt no record of the segment verifies. Repair cannot save
    them, but it must say so and keep their LSNs used: task ids derive from LSNs, and a
    new record under an old LSN could be taken for a delivery already made."""
    build(tmp_path, 50)  # two segments; the newest holds LSNs 34..49
    newest = segs(tmp_path)[-1]
    first = int(newest.stem)
    flip(newest, 20)  # header checksum fails
    code, out, _err = run_cli("repair", str(tmp_path))
    assert code == 0
    assert f"LOST: LSN {first}..49 ({50 - first} records)" in out
    with Wal.open(tmp_path, opts()) as wal:
        assert wal.append(b"after") == 50
        assert [lsn for lsn, _ in wal.iter_from(0)] == [*range(first), 50]


@pytest.mark.timeout(20)
@pytest.mark.parametrize("damage", ["zeroed", "cut"])
def test_a_sealed_segment_without_any_record_is_damage_not_a_loop(
    tmp_path: Path, damage: str
) -> None:
    """A middle segment zeroed (or cut) right after its header: the data stops at that
    segment's first LSN. Readers stopped there once; they reopened the same segment for
    ever (the pump, dump), as if it were the next one."""
    pays = build(tmp_path, 100)  # four segments
    middle = segs(tmp_path)[1]
    first = layout(middle)[0][0]
    if damage == "zeroed":
        patch(middle, SEGMENT_HEADER_SIZE, bytes(SEG - SEGMENT_HEADER_SIZE))
    else:
        os.truncate(middle, SEGMENT_HEADER_SIZE)
    after = int(segs(tmp_path)[2].stem)
    reason = f"ends at LSN {first}, next segment starts at {after}"
    if damage == "zeroed":
        reason = f"LSN 0 where {first} was expected"
    at = SEGMENT_HEADER_SIZE
    verdict = Verdict("sealed", expected(pays, first), 100, middle.name, at, reason)
    assert_readers(tmp_path, verdict)


@pytest.mark.parametrize(
    "content",
    [b"[]", b'"x"', b"5", b"null", b'{"format": 1, "wal_id": 5}', b'{"format": 1}',
     b"[" * 100_000],
    ids=["list", "string", "number", "null", "id-a-number", "no-id", "deep"],
)  # fmt: skip
def test_meta_of_the_wrong_shape_is_unreadable_meta_and_repair_rebuilds_it(
    tmp_path: Path, content: bytes
) -> None:
    """Valid JSON that is not META's object (or too deep to parse) is damage to META,
    named: it was an AttributeError or RecursionError traceback in every command."""
    pays = build(tmp_path, 60)
    with Wal.open(tmp_path, opts()) as wal:
        wal_id = wal.wal_id
    (tmp_path / "META").write_bytes(content)
    assert_readers(tmp_path, Verdict("refused", [], 0, "META", 0, "unreadable META"))
    code, out, err = run_cli("repair", str(tmp_path))
    assert code == 0, err
    assert f"rebuilt META from the segment headers (WAL id {wal_id})" in out
    assert_readers(tmp_path, Verdict("clean", expected(pays, 60)))


def test_a_directory_named_like_a_segment_is_named_by_every_reader(tmp_path: Path) -> None:
    """Reading a directory opened read-only fails with a bare "[Errno 21] Is a directory"
    that named no file (review): every command must say which."""
    build(tmp_path, 60)
    odd = tmp_path / f"{10**6:020d}.seg"
    odd.mkdir()
    for command in ("status", "verify", "dump"):
        code, _out, err = run_cli(command, str(tmp_path))
        assert code in (1, 2) and odd.name in err, (command, err)
    with pytest.raises(CorruptLogError) as info:  # damage of the log, repair's to fix
        Wal.open(tmp_path, opts())
    assert odd.name in str(info.value)


def test_repair_trusts_the_segments_over_a_meta_of_another_log(tmp_path: Path) -> None:
    """META readable but naming another log's id (restored from elsewhere), while every
    segment carries this log's: repair made every record a lost placeholder (review); the
    segments agree, so META is what is wrong, and it is rebuilt from them."""
    pays = build(tmp_path / "a", 60)
    build(tmp_path / "b", 5)
    with Wal.open(tmp_path / "a", opts()) as wal:
        wal_id = wal.wal_id
    shutil.copy(tmp_path / "b" / "META", tmp_path / "a" / "META")
    code, _out, err = run_cli("verify", str(tmp_path / "a"))
    assert code == 1 and "another log" in err, err
    code, out, err = run_cli("repair", str(tmp_path / "a"))
    assert code == 0, err
    assert f"rebuilt META from the segment headers (WAL id {wal_id})" in out, out
    assert "LOST" not in out, out
    assert_readers(tmp_path / "a", Verdict("clean", expected(pays, 60)))


@pytest.mark.parametrize("name", ["LOCK", "shm", "append.lock"])
def test_a_directory_where_a_lock_or_the_shared_state_should_be(tmp_path: Path, name: str) -> None:
    """Open failed with a bare IsADirectoryError (not a WalError), the read-only commands
    said ok, and repair could not fix it (review). Now every reader refuses naming it, and
    repair moves it aside: those files hold no record."""
    pays = build(tmp_path, 60)
    (tmp_path / name).unlink()
    (tmp_path / name).mkdir()
    assert_readers(tmp_path, Verdict("refused", [], 0, name, 0, "a directory"))
    code, out, err = run_cli("repair", str(tmp_path))
    assert code == 0, err
    assert name in out, out
    assert_readers(tmp_path, Verdict("clean", expected(pays, 60)))
