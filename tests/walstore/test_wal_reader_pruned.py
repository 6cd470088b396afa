"""A reader left behind by a prune (another handle moved the low water mark past its
position, as the pump does under a lagging reader or a live ``walstore dump``) is told
its LSN is no longer in the log: the log is healthy, not damaged."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

import walstore.reader
from walstore import LsnOutOfRangeError, Options, Wal
from walstore.inspect import dump, verify
from walstore.segments import list_segments


def _log(tmp_path: Path) -> tuple[Wal, list[int]]:
    wal = Wal.open(tmp_path / "wal", Options(segment_bytes=8192, min_free_bytes=0))
    for i in range(60):
        wal.append(f"record {i}".encode().ljust(500, b"."))
    firsts = sorted(int(p.name[:20]) for p in (tmp_path / "wal").glob("*.seg"))
    assert len(firsts) >= 4
    return wal, firsts


def test_a_reader_at_the_end_of_a_pruned_segment_is_out_of_range(tmp_path: Path) -> None:
    wal, firsts = _log(tmp_path)
    with wal:
        reader = wal.reader(firsts[0])
        got = reader.read(firsts[1] - firsts[0])  # exactly the first segment's records
        assert [lsn for lsn, _ in got] == list(range(firsts[0], firsts[1]))
        assert wal.set_low_water_mark(firsts[2] + 1) == 2
        with pytest.raises(LsnOutOfRangeError, match=f"LSN {firsts[1]} is no longer in the log"):
            reader.read()
        reader.close()
        assert wal.reader(firsts[2]).read(1)[0][0] == firsts[2]  # from the new first: reads
    assert verify(str(tmp_path / "wal")).ok


def test_a_segment_pruned_between_listing_and_opening_is_out_of_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader lists the segments, then opens one: a prune in between."""
    wal, firsts = _log(tmp_path)
    with wal:
        reader = wal.reader(firsts[0])
        reader.read(firsts[1] - firsts[0])
        stale = list_segments(wal._fs, wal.directory)
        wal.set_low_water_mark(firsts[2] + 1)
        real: Callable[..., list[int]] = list_segments
        calls = []

        def listed_before_the_prune(*args: object) -> list[int]:
            calls.append(args)
            return stale if len(calls) == 1 else real(*args)

        monkeypatch.setattr(walstore.reader, "list_segments", listed_before_the_prune)
        with pytest.raises(LsnOutOfRangeError, match=f"LSN {firsts[1]} is no longer in the log"):
            reader.read()
        reader.close()
        calls.clear()
        fresh = walstore.reader.Reader(wal._fs, wal.directory, firsts[1], wal.high_water_mark)
        with pytest.raises(LsnOutOfRangeError, match=f"LSN {firsts[1]} is no longer in the log"):
            fresh.read()  # _open_segment_for: listed, then pruned, then opened
        fresh.close()


def test_dump_goes_on_from_the_new_first_segment_past_a_prune(tmp_path: Path) -> None:
    """``walstore dump`` of a log the pump confirms and prunes meanwhile: the records it
    had not reached were confirmed and deleted; it goes on from what is left, to the end,
    instead of failing half-way ("no longer in the log", exit 2)."""
    directory = tmp_path / "wal"
    with Wal.open(directory, Options(segment_bytes=8192, min_free_bytes=0)) as wal:
        for start in range(0, 6000, 50):
            wal.append_batch([f"record {start + i}".encode().ljust(100) for i in range(50)])
        records = dump(str(directory))
        seen = [next(records)[0] for _ in range(3)]  # it has read ahead a few thousand
        assert wal.set_low_water_mark(5000) > 40
        first = list_segments(wal._fs, str(directory))[0]
        seen += [lsn for lsn, _payload in records]
    ahead = seen.index(first) if first in seen else len(seen)
    assert seen[:ahead] == list(range(ahead)), "the records read ahead, in order"
    assert 3 <= ahead < first, "then the prune"
    assert seen[ahead:] == list(range(first, 6000)), "then the rest of the log"


def test_dump_from_a_pruned_lsn_is_still_refused(tmp_path: Path) -> None:
    wal, firsts = _log(tmp_path)
    with wal:
        wal.set_low_water_mark(firsts[2])
        with pytest.raises(LsnOutOfRangeError, match="no longer in the log"):
            list(dump(str(tmp_path / "wal"), from_lsn=1))
