"""Sequential reading below the high water mark, in batches, with bounded memory."""

from __future__ import annotations

import os
from bisect import bisect_right
from collections.abc import Callable, Iterator

import crc32c as _crc32c

from .errors import CorruptLogError, LsnOutOfRangeError
from .format import (
    MAX_RECORD_BYTES,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    TYPE_DATA,
    VALID_TYPES,
    segment_name,
    unpack_segment_header,
)
from .fs import OsFs
from .scan import Record
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

    def close(self) -> None:
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
        """Up to ``max_records`` (lsn, payload) records in [next_lsn, high water mark)."""
        limit = self._hwm() if hwm is None else hwm
        out: list[Record] = []
        need = CHUNK
        while self.next_lsn < limit and len(out) < max_records:
            if self._fd < 0:
                self._open_segment_for(self.next_lsn)
            buf = self._fs.pread(self._fd, need, self._pos)
            used, more = self._parse(buf, limit, max_records, out)
            if used:
                need = CHUNK
            elif more > len(buf) and len(buf) == need:
                need = more  # a record larger than the chunk: read it whole
            elif more:
                self._corrupt(0, "record runs past the end of the file")
            else:
                self._next_segment()  # zeros or end of file: this segment's data ends
        return out

    def _parse(
        self, buf: bytes, limit: int, max_records: int, out: list[Record]
    ) -> tuple[int, int]:
        """Parse whole records; returns (bytes used, bytes needed for the next record)."""
        unpack, crc32c = RECORD_HEADER.unpack_from, _crc32c.crc32c
        append = out.append
        view = memoryview(buf)
        pos, lsn, want, salt, size = 0, self._cur, self.next_lsn, self._salt, len(buf)
        needed = 0
        while lsn < limit and len(out) < max_records:
            if pos + RECORD_HEADER_SIZE > size:
                break
            stored, length, rlsn, rtype = unpack(buf, pos)
            end = pos + RECORD_HEADER_SIZE + length
            if end > size:
                if length > MAX_RECORD_BYTES:
                    self._corrupt(pos, f"record length {length} exceeds the limit")
                needed = end - pos
                break
            if (
                rlsn != lsn
                or rtype not in VALID_TYPES
                or crc32c(view[pos + 4 : end], salt) != stored
            ):
                if stored == length == rlsn == rtype == 0:
                    break  # zeros: this segment's data ends here
                self._corrupt(pos, "record failed verification (LSN, type or checksum)")
            if rtype == TYPE_DATA and lsn >= want:
                append((lsn, buf[pos + RECORD_HEADER_SIZE : end]))
            pos, lsn = end, lsn + 1
        self._pos += pos
        self._cur = lsn
        self.next_lsn = max(want, lsn)
        return pos, needed

    def _corrupt(self, pos: int, reason: str) -> None:
        raise CorruptLogError(segment_name(self._seg), self._pos + pos, reason)

    def _open_segment_for(self, lsn: int) -> None:
        firsts = list_segments(self._fs, self._dir)
        idx = bisect_right(firsts, lsn) - 1
        if idx < 0:
            first = firsts[0] if firsts else None
            raise LsnOutOfRangeError(f"LSN {lsn} is no longer in the log (first LSN: {first})")
        self._open(firsts[idx])

    def _open(self, first: int) -> None:
        self.close()
        fd = self._fs.open(segment_path(self._dir, first), os.O_RDONLY)
        try:
            header = unpack_segment_header(self._fs.pread(fd, SEGMENT_HEADER_SIZE, 0))
        except ValueError as exc:
            self._fs.close(fd)
            raise CorruptLogError(segment_name(first), 0, str(exc)) from None
        self._fd, self._seg, self._salt = fd, first, header.salt
        self._pos, self._cur = SEGMENT_HEADER_SIZE, first

    def _next_segment(self) -> None:
        if self._cur not in list_segments(self._fs, self._dir):
            self._corrupt(
                0, f"data ends at LSN {self._cur} but no segment {segment_name(self._cur)} follows"
            )
        self._open(self._cur)
