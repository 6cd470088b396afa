"""Segment files: naming, listing, headers, creation."""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets

from .errors import CorruptLogError
from .format import (
    NO_PREVIOUS,
    SEGMENT_HEADER_SIZE,
    SegmentHeader,
    pack_segment_header,
    parse_segment_name,
    segment_name,
    unpack_segment_header,
)
from .fs import OsFs

_ZERO_CHUNK = bytes(1024 * 1024)


def list_segments(fs: OsFs, directory: str) -> list[int]:
    """First LSNs of the segments in ``directory``, ascending."""
    firsts = (parse_segment_name(n) for n in fs.listdir(directory))
    return sorted(f for f in firsts if f is not None)


def segment_path(directory: str, first_lsn: int) -> str:
    return os.path.join(directory, segment_name(first_lsn))


def read_header(fs: OsFs, directory: str, first_lsn: int, wal_id: bytes) -> SegmentHeader:
    """Read and check one segment's header against its name and the log's id."""
    name = segment_name(first_lsn)
    try:
        fd = fs.open(os.path.join(directory, name), os.O_RDONLY)
        try:
            raw = fs.pread(fd, SEGMENT_HEADER_SIZE, 0)
        finally:
            fs.close(fd)
    except IsADirectoryError:
        raise CorruptLogError(name, 0, "is a directory, not a segment file") from None
    try:
        header = unpack_segment_header(raw)
    except ValueError as exc:
        raise CorruptLogError(name, 0, str(exc)) from None
    if header.first_lsn != first_lsn:
        raise CorruptLogError(name, 0, f"header says first LSN {header.first_lsn}")
    if header.wal_id != wal_id:
        raise CorruptLogError(name, 0, "segment belongs to another log (WAL id differs)")
    return header


def check_chain(
    fs: OsFs, directory: str, firsts: list[int], wal_id: bytes
) -> dict[int, SegmentHeader]:
    """Every header valid, and each segment names its predecessor: no gap in between."""
    headers = {f: read_header(fs, directory, f, wal_id) for f in firsts}
    for prev, cur in itertools.pairwise(firsts):
        if headers[cur].prev_first_lsn != prev:
            missing = headers[cur].prev_first_lsn
            what = "none" if missing == NO_PREVIOUS else segment_name(missing)
            raise CorruptLogError(
                segment_name(cur),
                0,
                f"gap in the segment sequence: previous segment is {what}, "
                f"found {segment_name(prev)} (a segment is missing)",
            )
    return headers


def create_segment(
    fs: OsFs,
    directory: str,
    first_lsn: int,
    prev_first_lsn: int,
    wal_id: bytes,
    size: int,
    preallocate: bool,
) -> tuple[int, int]:
    """Create a segment atomically (temp, fill, fsync, rename, fsync dir).

    Returns (read-write fd, salt). With ``preallocate`` the file is zero-filled to
    ``size`` so later fdatasyncs need not touch the file size."""
    salt = secrets.randbits(32)
    final = segment_path(directory, first_lsn)
    tmp = final + ".tmp"
    fd = fs.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        fs.pwrite(fd, pack_segment_header(salt, first_lsn, prev_first_lsn, wal_id), 0)
        if preallocate:
            pos = SEGMENT_HEADER_SIZE
            while pos < size:
                chunk = _ZERO_CHUNK[: min(len(_ZERO_CHUNK), size - pos)]
                fs.pwrite(fd, chunk, pos)
                pos += len(chunk)
        fs.fdatasync(fd)
        fs.rename(tmp, final)
        fs.fsync_dir(directory)
    except BaseException:
        fs.close(fd)
        with contextlib.suppress(OSError):
            fs.unlink(tmp)
        raise
    return fd, salt
