"""Sequential reading below the high water mark, in batches, with bounded memory."""

from __future__ import annotations

import os
import struct
from bisect import bisect_right
from collections.abc import Callable, Iterator
from typing import NoReturn

import crc32c as _crc32c

from .errors import CorruptLogError, LsnOutOfRangeError, WalError
from .format import (
    MAX_RECORD_BYTES,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    TYPE_DATA,
    TYPE_LOST,
    segment_name,
    unpack_segment_header,
)
from .fs import OsFs
from .scan import Record, check_record
from .segments import list_segments, segment_path

CHUNK = 1024 * 1024


class Reader:
    """Reads records from ``next_lsn`` on, never at or past the high water mark.

    Keeps its position between calls, so a pump that polls ``read`` does not rescan.
    Memory is one chunk (1 MiB, or one record if larger) whatever the log's size."""

    def __init__(self, fs: OsFs, directory: str, start_lsn: int, hwm: Callable[[], int]) -> None:
        self._fs = fs
        self._dir = directory
        self._hwm = hwm
        self.next_lsn = start_lsn  # the next LSN a read returns (or skips, if lost)
        self._fd = -1
        self._seg = -1
        self._salt = 0
        self._pos = 0  # offset in the segment of the record with LSN _cur
        self._cur = 0
        self._error: WalError | OSError | None = None  # raised by the next read
        # The last chunk read, kept for the next call: where it starts in the segment, and
        # the high water mark when it was read (records below it were whole then; bytes
        # past it may have been mid-write, and are never parsed from this copy).
        self._buf = b""
        self._buf_pos = 0
        self._buf_hwm = 0

    def close(self) -> None:
        self._buf = b""
        if self._fd >= 0:
            self._fs.close(self._fd)
            self._fd = -1

    def __iter__(self) -> Iterator[Record]:
        for batch in self.batches():
            yield from batch

    def batches(self) -> Iterator[list[Record]]:
        """``read()`` until the high water mark (as of each batch) is reached."""
        while True:
            batch = self.read()
            if not batch and self.next_lsn >= self._hwm():
                return
            yield batch

    def read(self, max_records: int = 4096, hwm: int | None = None) -> list[Record]:
        """Up to ``max_records`` (lsn, payload) records in [next_lsn, high water mark).

        ``next_lsn`` is always the first LSN not returned. If reading fails (a record
        that does not verify, an I/O error) after some records were parsed, those are
        returned and the error is raised by the next call, at the failing record."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        limit = self._hwm() if hwm is None else hwm
        out: list[Record] = []
        try:
            self._read_into(out, limit, max_records)
        except (WalError, OSError) as exc:
            self._buf = b""  # the next call reads the disk again (a mended sector, say)
            if not out:
                raise
            self._error = exc
        return out

    def _read_into(self, out: list[Record], limit: int, max_records: int) -> None:
        need = CHUNK
        while self.next_lsn < limit and len(out) < max_records:
            if self._fd < 0:
                self._open_segment_for(self.next_lsn)
            base = self._pos - self._buf_pos
            if (
                self._cur < self._buf_hwm
                and base >= 0
                and base + RECORD_HEADER_SIZE <= len(self._buf)
            ):  # the rest of the last chunk: a call that stopped at max_records goes on
                try:
                    used, _more = self._parse(self._buf, base, min(limit, self._buf_hwm),
                                              max_records, out)  # fmt: skip
                except CorruptLogError:
                    used = 0  # the disk has the last word: read again from the bad record
                if not used:
                    self._buf = b""  # or its end cuts the next record: read on from here
                continue
            buf = self._fs.pread(self._fd, need, self._pos)
            self._buf, self._buf_pos, self._buf_hwm = buf, self._pos, limit
            used, more = self._parse(buf, 0, limit, max_records, out)
            if used:
                need = CHUNK
            elif more > len(buf) and len(buf) == need:
                need = more  # a record larger than the chunk: read it whole
            elif more:
                self._corrupt(0, f"record of {more - RECORD_HEADER_SIZE} bytes runs past the "
                              "end of the segment")  # fmt: skip
            else:
                self._next_segment()  # zeros or end of file: this segment's data ends

    def _parse(
        self, buf: bytes, base: int, limit: int, max_records: int, out: list[Record]
    ) -> tuple[int, int]:
        """Parse whole records from ``buf[base:]`` (at the position); returns (bytes used,
        bytes needed for the next record).

        The position moves past exactly the records parsed, also when one fails."""
        pos, lsn, want = base, self._cur, self.next_lsn
        # Each LSN gives at most one record: stopping at this LSN bounds the batch
        # without counting the list on every record (as a bare loop would not).
        stop = min(limit, max(lsn, want) + max_records - len(out))
        if lsn < want:  # starting mid-segment: verify, but do not return, what precedes
            pos, lsn = self._records(buf, pos, lsn, min(want, stop), None)
        if lsn >= want:
            pos, lsn = self._records(buf, pos, lsn, stop, out)
        used = pos - base
        self._pos += used
        self._cur = lsn
        self.next_lsn = max(want, lsn)
        if lsn >= stop:
            return used, 0
        # Stopped early: the end of the buffer, zeros, or a bad record.
        size, hsize = len(buf), RECORD_HEADER_SIZE
        if pos + hsize > size:
            return used, 0  # the next header is not (all) in this buffer: read on
        stored, length, rlsn, rtype = RECORD_HEADER.unpack_from(buf, pos)
        if stored == length == rlsn == rtype == 0:
            return used, 0  # zeros: this segment's data ends here
        if pos + hsize + length > size and length <= MAX_RECORD_BYTES:
            return used, hsize + length  # a whole record needs a bigger read
        reason = check_record(buf, pos, self._salt, lsn)[2]
        self._corrupt(0, reason or "record failed verification")
        return used, 0

    def _records(
        self, buf: bytes, pos: int, lsn: int, stop: int, out: list[Record] | None
    ) -> tuple[int, int]:
        """Verify records from ``pos`` until LSN ``stop`` or one fails (returns where it
        stopped); append the data records to ``out`` unless it is None. The hot loop of
        every read: the checks that can only fail at the end of the data are left to
        the caller."""
        unpack, crc32c = RECORD_HEADER.unpack_from, _crc32c.crc32c
        view, salt, size = memoryview(buf), self._salt, len(buf)
        hsize, data, lost = RECORD_HEADER_SIZE, TYPE_DATA, TYPE_LOST
        append = (out if out is not None else []).append  # None: parsed, then dropped
        start = lsn
        try:
            # A for over a range, not a while with a counter: ~15% of the loop's time.
            for lsn in range(start, stop):
                stored, length, rlsn, rtype = unpack(buf, pos)
                end = pos + hsize + length
                if rlsn != lsn or end > size or crc32c(view[pos + 4 : end], salt) != stored:
                    break
                if rtype == data:
                    append((lsn, buf[pos + hsize : end]))
                elif rtype != lost:
                    break
                pos = end
            else:
                lsn = max(start, stop)  # every record up to stop: none stopped it
        except struct.error:
            pass  # the next header runs past the end of the buffer
        return pos, lsn

    def _corrupt(self, pos: int, reason: str) -> None:
        raise CorruptLogError(segment_name(self._seg), self._pos + pos, reason)

    def _open_segment_for(self, lsn: int) -> None:
        firsts = list_segments(self._fs, self._dir)
        idx = bisect_right(firsts, lsn) - 1
        if idx < 0:
            self._pruned(lsn, firsts)
        self._open(firsts[idx], lsn)

    def _pruned(self, lsn: int, firsts: list[int]) -> NoReturn:
        """``lsn`` is below every segment left: pruned (a prune removes the oldest
        segments, wholly below the low water mark), not a gap."""
        first = firsts[0] if firsts else None
        raise LsnOutOfRangeError(f"LSN {lsn} is no longer in the log (first LSN: {first})")

    def _open(self, first: int, lsn: int) -> None:
        """Open the segment starting at ``first`` to read ``lsn`` in it."""
        self.close()
        try:
            fd = self._fs.open(segment_path(self._dir, first), os.O_RDONLY)
        except FileNotFoundError:
            firsts = list_segments(self._fs, self._dir)  # listed, then pruned meanwhile?
            if not firsts or firsts[0] > first:
                self._pruned(lsn, firsts)
            raise
        try:
            header = unpack_segment_header(self._fs.pread(fd, SEGMENT_HEADER_SIZE, 0))
        except ValueError as exc:
            self._fs.close(fd)
            raise CorruptLogError(segment_name(first), 0, str(exc)) from None
        except BaseException:
            self._fs.close(fd)
            raise
        self._fd, self._seg, self._salt = fd, first, header.salt
        self._pos, self._cur = SEGMENT_HEADER_SIZE, first
        self._buf = b""

    def _next_segment(self) -> None:
        """The data of this segment ends at ``_pos``: go on to the next segment, which must
        start at the next LSN (else the data stops early: damage, named where it is)."""
        firsts = list_segments(self._fs, self._dir)
        # A segment with no record at all ends where it starts: its next is not itself.
        if self._cur == self._seg or self._cur not in firsts:
            if firsts and firsts[0] > self._cur:
                self._pruned(self._cur, firsts)  # under this reader, by another handle
            buf = self._fs.pread(self._fd, RECORD_HEADER_SIZE, self._pos)
            later = [f for f in firsts if f > self._seg]
            if buf:  # zeros or part of a header where the next record should start
                reason = check_record(buf, 0, self._salt, self._cur)[2] or "bad record"
            elif later:  # the words of verify, which finds this too
                reason = f"ends at LSN {self._cur}, next segment starts at {later[0]}"
            else:
                reason = f"data ends at LSN {self._cur} and no segment follows"
            self._corrupt(0, reason)
        self._open(self._cur, self._cur)
