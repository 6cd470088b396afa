"""The log's API: append, batches, reading, roll-over, watermarks and pruning, reopening,
limits, closed handles, file modes and names."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.faultfs import FaultFs
from walstore import (
    LogClosedError,
    LogFullError,
    LsnOutOfRangeError,
    Options,
    RecordTooLargeError,
    SyncPolicy,
    Wal,
)
from walstore.format import SEGMENT_HEADER_SIZE, segment_name, unpack_segment_header

pytestmark = pytest.mark.timeout(30)

SEG = 4160  # the smallest segment: a roll-over every ~30 small records


def small(**kw: Any) -> Options:
    base: dict[str, Any] = {"segment_bytes": SEG, "preallocate": False, "min_free_bytes": 0}
    base.update(kw)
    return Options(**base)


def payload(lsn: int, size: int = 100) -> bytes:
    head = f"rec-{lsn}:".encode()
    return head + bytes([lsn % 251]) * max(0, size - len(head))


def read_all(wal: Wal, start: int | None = None) -> list[tuple[int, bytes]]:
    return list(wal.iter_from(wal.first_lsn() if start is None else start))


def segment_files(path: Path) -> list[str]:
    return sorted(n for n in os.listdir(path) if n.endswith(".seg"))


def fill(wal: Wal, count: int, size: int = 100) -> list[int]:
    start = wal.next_lsn()
    return [wal.append(payload(start + i, size)) for i in range(count)]


# ----------------------------------------------------------------- append and read
def test_append_returns_consecutive_lsns_durable_at_once(tmp_path: Path) -> None:
    with Wal.open(tmp_path, small()) as wal:
        assert (wal.next_lsn(), wal.high_water_mark(), wal.low_water_mark()) == (0, 0, 0)
        lsns = [wal.append(payload(i)) for i in range(5)]
        assert lsns == [0, 1, 2, 3, 4]
        assert wal.high_water_mark() == wal.next_lsn() == 5
        assert read_all(wal) == [(i, payload(i)) for i in range(5)]


def test_empty_payload_and_empty_batch(tmp_path: Path) -> None:
    with Wal.open(tmp_path, small()) as wal:
        assert wal.append_batch([]) == range(0)
        assert wal.next_lsn() == 0
        assert wal.append(b"") == 0
        assert read_all(wal) == [(0, b"")]


def test_batch_is_one_contiguous_range_in_order(tmp_path: Path) -> None:
    with Wal.open(tmp_path, small()) as wal:
        wal.append(b"first")
        batch = [payload(1 + i, 10 + i) for i in range(7)]
        assert wal.append_batch(batch) == range(1, 8)
        assert wal.append(b"after") == 8
        got = read_all(wal)
        assert [r[0] for r in got] == list(range(9))
        assert [r[1] for r in got] == [b"first", *batch, b"after"]


def test_payload_must_be_bytes(tmp_path: Path) -> None:
    with Wal.open(tmp_path, small()) as wal:
        with pytest.raises(TypeError):
            wal.append_batch([b"ok", "text"])  # type: ignore[list-item]
        assert wal.next_lsn() == 0


def test_reader_keeps_its_position_and_stops_at_the_hwm(tmp_path: Path) -> None:
    with Wal.open(tmp_path, small()) as wal:
        fill(wal, 10)
        reader = wal.reader(2)
        try:
            assert [r[0] for r in reader.read(3)] == [2, 3, 4]
            assert reader.next_lsn == 5
            assert [r[0] for r in reader.read(100)] == list(range(5, 10))
            assert reader.read(100) == []
            assert reader.next_lsn == 10
            wal.append(payload(10))
            assert reader.read(100) == [(10, payload(10))]
        finally:
            reader.close()
        again = wal.reader(10)
        assert again.read() == [(10, payload(10))]
        again.close()
        with pytest.raises(LsnOutOfRangeError):
            wal.reader(12)


def test_reader_defaults_to_the_low_water_mark(tmp_path: Path) -> None:
    with Wal.open(tmp_path, small()) as wal:
        fill(wal, 6)
        wal.set_low_water_mark(4)
        reader = wal.reader()
        assert [r[0] for r in reader.read()] == [4, 5]
        reader.close()


def test_iter_from_the_middle(tmp_path: Path) -> None:
    with Wal.open(tmp_path, small()) as wal:
        fill(wal, 80)  # several segments
        assert [r[0] for r in wal.iter_from(37)] == list(range(37, 80))


def test_large_record_is_read_whole(tmp_path: Path) -> None:
    # Larger than the reader's 1 MiB chunk and than the segment size.
    big = os.urandom(1024 * 1024 + 3)
    with Wal.open(tmp_path, small(max_record_bytes=2 * 1024 * 1024)) as wal:
        wal.append(b"a")
        assert wal.append(big) == 1
        wal.append(b"z")
        assert [r[1] for r in read_all(wal)] == [b"a", big, b"z"]


# ----------------------------------------------------------------- segments
def test_roll_over_names_segments_by_their_first_lsn(tmp_path: Path) -> None:
    with Wal.open(tmp_path, small()) as wal:
        fill(wal, 100)
        names = segment_files(tmp_path)
        assert len(names) >= 3
        assert all(re.fullmatch(r"\d{20}\.seg", n) for n in names)
        assert names[0] == segment_name(0) == "00000000000000000000.seg"
        firsts = [int(n[:20]) for n in names]
        records = read_all(wal)
        for i, first in enumerate(firsts):
            raw = (tmp_path / names[i]).read_bytes()
            header = unpack_segment_header(raw[:SEGMENT_HEADER_SIZE])
            assert header.first_lsn == first
            assert header.prev_first_lsn == (firsts[i - 1] if i else 2**64 - 1)
            assert header.wal_id.hex() == wal.wal_id
            # Sealed segments stay within the size; each record is whole in one segment.
            if i < len(firsts) - 1:
                assert len(raw) <= SEG
        assert [r[1] for r in records] == [payload(i) for i in range(100)]
        assert wal.status().segments == len(names)


def test_oversized_record_gets_a_segment_of_its_own(tmp_path: Path) -> None:
    with Wal.open(tmp_path, small()) as wal:
        wal.append(b"x")
        wal.append(bytes(SEG * 2))
        wal.append(b"y")
        assert segment_files(tmp_path) == [segment_name(0), segment_name(1), segment_name(2)]
        assert [r[0] for r in read_all(wal)] == [0, 1, 2]


def test_preallocated_segment_is_zero_filled_to_its_size(tmp_path: Path) -> None:
    with Wal.open(tmp_path, small(preallocate=True)) as wal:
        wal.append(b"abc")
        assert (tmp_path / segment_name(0)).stat().st_size == SEG
        fill(wal, 60)
        names = segment_files(tmp_path)
        # Sealed segments are cut back to their last record.
        assert (tmp_path / names[0]).stat().st_size < SEG
        assert (tmp_path / names[-1]).stat().st_size == SEG


# ----------------------------------------------------------------- watermarks and pruning
def test_prune_deletes_only_sealed_segments_wholly_below_the_lwm(tmp_path: Path) -> None:
    with Wal.open(tmp_path, small()) as wal:
        fill(wal, 120)
        firsts = [int(n[:20]) for n in segment_files(tmp_path)]
        assert len(firsts) >= 4
        # One below the start of the third segment: the second still holds LSN lwm.
        lwm = firsts[2] - 1
        assert wal.set_low_water_mark(lwm) == 1
        assert wal.low_water_mark() == lwm
        assert [int(n[:20]) for n in segment_files(tmp_path)] == firsts[1:]
        assert wal.first_lsn() == firsts[1]
        # Exactly at a segment boundary: the segment below it goes.
        assert wal.set_low_water_mark(firsts[2]) == 1
        assert wal.first_lsn() == firsts[2]
        assert [r[0] for r in wal.iter_from(wal.low_water_mark())] == list(range(firsts[2], 120))
        with pytest.raises(LsnOutOfRangeError):
            wal.reader(firsts[1]).read()


def test_prune_never_deletes_the_active_segment(tmp_path: Path) -> None:
    with Wal.open(tmp_path, small()) as wal:
        fill(wal, 100)
        active = segment_files(tmp_path)[-1]
        wal.set_low_water_mark(wal.high_water_mark())
        assert segment_files(tmp_path) == [active]
        assert wal.low_water_mark() == wal.high_water_mark() == wal.next_lsn() == 100
        assert wal.status().pending == 0
        assert wal.append(b"more") == 100
        assert read_all(wal)[-1] == (100, b"more")


def test_lwm_is_monotonic_and_never_past_the_hwm(tmp_path: Path) -> None:
    with Wal.open(tmp_path, small()) as wal:
        fill(wal, 50)
        wal.set_low_water_mark(40)
        before = segment_files(tmp_path)
        assert wal.set_low_water_mark(10) == 0
        assert wal.set_low_water_mark(40) == 0
        assert wal.low_water_mark() == 40
        with pytest.raises(LsnOutOfRangeError):
            wal.set_low_water_mark(51)
        assert wal.low_water_mark() == 40
        assert segment_files(tmp_path) == before
        wal.set_low_water_mark(50)  # equal to the HWM is allowed: everything confirmed
        assert wal.low_water_mark() == 50


def test_status_reports_the_log(tmp_path: Path) -> None:
    with Wal.open(tmp_path, small()) as wal:
        fill(wal, 70)
        wal.set_low_water_mark(5)
        st = wal.status()
        assert (st.next_lsn, st.high_water_mark, st.low_water_mark) == (70, 70, 5)
        assert st.pending == 65
        assert st.first_lsn == 0
        assert st.segments == len(segment_files(tmp_path))
        on_disk = sum((tmp_path / n).stat().st_size for n in segment_files(tmp_path))
        assert st.bytes == on_disk


# ----------------------------------------------------------------- reopen
def test_reopen_keeps_records_marks_and_id(tmp_path: Path) -> None:
    with Wal.open(tmp_path, small()) as wal:
        fill(wal, 90)
        wal.set_low_water_mark(45)
        wal_id, first = wal.wal_id, wal.first_lsn()
    assert re.fullmatch(r"[0-9a-f]{32}", wal_id)
    with Wal.open(tmp_path, small()) as wal:
        assert wal.wal_id == wal_id
        assert (wal.low_water_mark(), wal.high_water_mark(), wal.next_lsn()) == (45, 90, 90)
        assert wal.first_lsn() == first
        assert read_all(wal) == [(i, payload(i)) for i in range(first, 90)]
        assert wal.append(b"next") == 90
    with Wal.open(tmp_path, small()) as wal:
        assert read_all(wal, 90) == [(90, b"next")]


def test_reopen_with_sync_none_keeps_what_close_flushed(tmp_path: Path) -> None:
    with Wal.open(tmp_path, small(sync=SyncPolicy.NONE)) as wal:
        fill(wal, 40)
    with Wal.open(tmp_path, small(sync=SyncPolicy.NONE)) as wal:
        assert read_all(wal) == [(i, payload(i)) for i in range(40)]


def test_two_handles_share_one_sequence(tmp_path: Path) -> None:
    a = Wal.open(tmp_path, small())
    b = Wal.open(tmp_path, small())
    try:
        got = []
        for i in range(60):
            got.append((a if i % 2 else b).append(payload(i)))
        assert got == list(range(60))
        assert b.high_water_mark() == a.high_water_mark() == 60
        assert read_all(b) == [(i, payload(i)) for i in range(60)]
    finally:
        a.close()
        b.close()


# ----------------------------------------------------------------- limits
def test_record_too_large_appends_nothing(tmp_path: Path) -> None:
    with Wal.open(tmp_path, small(max_record_bytes=1000)) as wal:
        wal.append(bytes(1000))
        with pytest.raises(RecordTooLargeError) as info:
            wal.append(bytes(1001))
        assert isinstance(info.value, ValueError)
        with pytest.raises(RecordTooLargeError):
            wal.append_batch([b"ok", bytes(1001)])
        assert wal.next_lsn() == wal.high_water_mark() == 1
        assert [r[0] for r in read_all(wal)] == [0]


def test_record_size_is_its_bytes_whatever_the_buffer_shape(tmp_path: Path) -> None:
    """len() of a memoryview counts items, not bytes (a 2-D view of 1001 bytes has len 1,
    an array of 300 4-byte ints has len 300): the limit is on the bytes written, so such
    a payload is refused, never written past max_record_bytes (review 4)."""
    import array

    flat = memoryview(bytes(1001)).cast("B", shape=[1, 1001])
    ints = memoryview(array.array("I", [7] * 300))  # 1200 bytes
    with Wal.open(tmp_path, small(max_record_bytes=1000)) as wal:
        for too_big in (flat, ints):
            with pytest.raises(RecordTooLargeError):
                wal.append(too_big)  # type: ignore[arg-type]
            with pytest.raises(RecordTooLargeError):
                wal.append_batch([b"ok", too_big])  # type: ignore[list-item]
        assert wal.next_lsn() == wal.high_water_mark() == 0
        fits = memoryview(array.array("I", [7] * 250))  # 1000 bytes: the limit itself
        assert wal.append(fits) == 0  # type: ignore[arg-type]
        assert read_all(wal) == [(0, fits.tobytes())]


def test_segment_size_is_bounded_and_a_new_log_keeps_the_free_space_floor(
    tmp_path: Path,
) -> None:
    """A huge segment size is refused with the variable named, and the first segment is
    created under the same free-space floor as every later one (review 4: a 1 TB
    WAL_SEGMENT_BYTES made Wal.open write zeros until the disk was full)."""
    with pytest.raises(ValueError, match=r"WAL_SEGMENT_BYTES='1000000000000'.*at most"):
        Options.from_env({"WAL_SEGMENT_BYTES": "1000000000000"})
    with pytest.raises(ValueError, match="at most"):
        Options(segment_bytes=(1 << 30) + 1)
    assert Options(segment_bytes=1 << 30).segment_bytes == 1 << 30
    with pytest.raises(LogFullError, match="free"):
        Wal.open(tmp_path / "new", Options(segment_bytes=1 << 20, min_free_bytes=10**18))
    assert not list((tmp_path / "new").glob("*.seg"))
    with Wal.open(tmp_path / "new", small()) as wal:  # room again: opens as a new log
        assert wal.append(b"first") == 0


def test_low_water_mark_must_be_an_int(tmp_path: Path) -> None:
    """review 4: 1.5 raised struct.error from deep inside."""
    with Wal.open(tmp_path, small()) as wal:
        wal.append(b"x")
        for bad in (1.5, "1", True, None):
            with pytest.raises(TypeError, match="lsn must be an int"):
                wal.set_low_water_mark(bad)  # type: ignore[arg-type]
        assert wal.low_water_mark() == 0
        assert wal.set_low_water_mark(1) == 0


def test_log_full_at_the_byte_cap_appends_nothing(tmp_path: Path) -> None:
    with Wal.open(tmp_path, small(max_bytes=2 * SEG)) as wal:
        acked = []
        with pytest.raises(LogFullError):
            for i in range(200):
                acked.append(wal.append(payload(i)))
        assert 60 <= len(acked) < 80
        end = len(acked)
        for _ in range(3):  # refused every time, not just once
            with pytest.raises(LogFullError):
                wal.append(b"x")
        assert wal.next_lsn() == wal.high_water_mark() == end
        assert read_all(wal) == [(i, payload(i)) for i in range(end)]
        # Confirming the backlog frees room again.
        wal.set_low_water_mark(end)
        assert wal.append(b"after") == end
        assert read_all(wal, end) == [(end, b"after")]


def test_log_full_when_the_disk_is_nearly_full(tmp_path: Path) -> None:
    fs = FaultFs()
    with Wal.open(tmp_path, small(min_free_bytes=1 << 20, fs=fs)) as wal:
        fill(wal, 30)  # the first segment is nearly full
        fs.free_bytes_value = SEG  # less than a segment plus min_free_bytes
        with pytest.raises(LogFullError):
            fill(wal, 10)
        end = wal.next_lsn()
        assert end < 40
        assert len(segment_files(tmp_path)) == 1
        fs.free_bytes_value = None
        assert wal.append(b"room") == end
        assert read_all(wal)[-1] == (end, b"room")


# ----------------------------------------------------------------- closed handles
def test_closed_log_raises(tmp_path: Path) -> None:
    wal = Wal.open(tmp_path, small())
    wal.append(b"a")
    wal.close()
    wal.close()  # a second close is harmless
    calls: list[Callable[[], object]] = [
        lambda: wal.append(b"b"),
        lambda: wal.append_batch([b"b"]),
        lambda: wal.sync(),
        lambda: wal.reader(0),
        lambda: list(wal.iter_from(0)),
        lambda: wal.first_lsn(),
        lambda: wal.next_lsn(),
        lambda: wal.high_water_mark(),
        lambda: wal.low_water_mark(),
        lambda: wal.set_low_water_mark(1),
        lambda: wal.status(),
    ]
    for call in calls:
        with pytest.raises(LogClosedError):
            call()
    with Wal.open(tmp_path, small()) as again:
        assert [r[1] for r in read_all(again)] == [b"a"]


# ----------------------------------------------------------------- files
def test_file_modes_and_names(tmp_path: Path) -> None:
    directory = tmp_path / "wal"
    with Wal.open(directory, small()) as wal:
        fill(wal, 50)
        wal.set_low_water_mark(3)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    names = os.listdir(directory)
    locks = {"LOCK", "append.lock"}
    assert {"META", "CHECKPOINT", "shm", *locks} <= set(names)
    assert not [n for n in names if n.endswith(".tmp")]
    for name in names:
        mode = stat.S_IMODE((directory / name).stat().st_mode)
        assert mode == 0o600, f"{name} has mode {oct(mode)}"
    assert len(segment_files(directory)) >= 2
