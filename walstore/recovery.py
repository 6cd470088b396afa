"""Bringing a log back to a consistent state from what is on disk (done by the first
process that opens it, alone): leftovers of crashed roll-overs removed, the segment chain
checked from headers alone, and the newest segment's torn tail cut back."""

from __future__ import annotations

import json
import os
import time
import uuid

from .errors import CorruptLogError
from .format import (
    FORMAT_VERSION,
    NO_PREVIOUS,
    SEGMENT_HEADER_SIZE,
    pack_checkpoint,
    segment_name,
    unpack_checkpoint,
)
from .fs import OsFs
from .options import Options
from .scan import ScanResult, find_valid_after, last_nonzero_end, scan
from .segments import check_chain, create_segment, list_segments, segment_path
from .shm import INTENT_NONE, WriteState

META = "META"
CHECKPOINT = "CHECKPOINT"
TORN_DIR = "torn"


def load_meta(fs: OsFs, directory: str, create: bool) -> bytes:
    """The log's 16-byte id, from META (written once, atomically, when absent)."""
    path = os.path.join(directory, META)
    if not fs.exists(path):
        if not create:
            raise CorruptLogError(META, 0, "META is missing: is this a walstore directory?")
        meta = {"format": FORMAT_VERSION, "wal_id": uuid.uuid4().hex}
        fs.write_file_atomic(directory, META, json.dumps(meta).encode())
    try:
        meta = json.loads(fs.read_file(path))
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"unsupported format {meta.get('format')!r}")
        return uuid.UUID(hex=meta["wal_id"]).bytes
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptLogError(META, 0, f"unreadable META: {exc}") from None


def read_checkpoint(fs: OsFs, directory: str) -> int:
    path = os.path.join(directory, CHECKPOINT)
    if not fs.exists(path):
        return 0
    try:
        return unpack_checkpoint(fs.read_file(path))
    except ValueError as exc:
        raise CorruptLogError(CHECKPOINT, 0, str(exc)) from None


def write_checkpoint(fs: OsFs, directory: str, lsn: int) -> None:
    fs.write_file_atomic(directory, CHECKPOINT, pack_checkpoint(lsn))


def remove_temp_files(fs: OsFs, directory: str) -> None:
    leftovers = [n for n in fs.listdir(directory) if n.endswith(".tmp")]
    for name in leftovers:
        fs.unlink(os.path.join(directory, name))
    if leftovers:
        fs.fsync_dir(directory)


def recover(fs: OsFs, directory: str, opts: Options) -> tuple[WriteState, bytes, int]:
    """Recover the log; returns (write state, WAL id, low water mark)."""
    remove_temp_files(fs, directory)
    firsts = list_segments(fs, directory)
    # Only a new log gets an id: segments without META mean damage, and a fresh id would
    # make every one of them fail validation for good.
    wal_id = load_meta(fs, directory, create=not firsts)
    lwm = read_checkpoint(fs, directory)
    if not firsts:
        if lwm:
            raise CorruptLogError(CHECKPOINT, 0, f"low water mark {lwm} but no segment exists")
        fd, salt = create_segment(
            fs, directory, 0, NO_PREVIOUS, wal_id, opts.segment_bytes, opts.preallocate
        )
        fs.close(fd)
        return WriteState(0, salt, INTENT_NONE, SEGMENT_HEADER_SIZE, 0, 0, 0), wal_id, 0
    headers = check_chain(fs, directory, firsts, wal_id)
    if firsts[0] > lwm:
        raise CorruptLogError(
            segment_name(firsts[0]), 0, f"segments before it are missing (low water mark {lwm})"
        )
    newest = firsts[-1]
    salt = headers[newest].salt
    result = recover_tail(fs, directory, newest, salt)
    # The crashed process may have renamed or unlinked files (a new segment, CHECKPOINT,
    # a prune) and died before its directory fsync: make the directory as we found it
    # durable before anything in it counts as below the high water mark.
    fs.fsync_dir(directory)
    if result.next_lsn < lwm:
        raise CorruptLogError(
            segment_name(newest),
            result.end,
            f"log ends at LSN {result.next_lsn}, below the low water mark {lwm}",
        )
    sealed = sum(fs.size(segment_path(directory, f)) for f in firsts[:-1])
    state = WriteState(newest, salt, INTENT_NONE, result.end, result.next_lsn, sealed, 0)
    return state, wal_id, lwm


def recover_tail(fs: OsFs, directory: str, first: int, salt: int) -> ScanResult:
    """Scan the newest segment; cut a torn tail (after copying it aside); fsync.

    Raises CorruptLogError if a bad record is followed by a valid one."""
    name = segment_name(first)
    fd = fs.open(segment_path(directory, first), os.O_RDWR)
    try:
        buf = fs.pread(fd, fs.fsize(fd), 0)
        result = scan(buf, SEGMENT_HEADER_SIZE, salt, first)
        stop = result.stop
        if stop is not None and not stop.zero:
            found = find_valid_after(buf, stop.offset, salt, result.next_lsn)
            if found is not None:
                raise CorruptLogError(
                    name,
                    stop.offset,
                    f"{stop.reason}; a valid record (LSN {found[1]}) follows at offset "
                    f"{found[0]}, so this is not a torn tail",
                )
            cut_end = last_nonzero_end(buf, stop.offset)
            _save_torn(fs, directory, name, stop.offset, buf[stop.offset : cut_end])
            # Zeros rather than ftruncate: the segment stays preallocated.
            fs.pwrite(fd, bytes(cut_end - stop.offset), stop.offset)
        # What we scanned may have been only in the page cache (a process crash, not a
        # power cut): make it durable before it counts as below the high water mark.
        fs.fdatasync(fd)
        return result
    finally:
        fs.close(fd)


def _save_torn(fs: OsFs, directory: str, name: str, offset: int, data: bytes) -> None:
    torn = os.path.join(directory, TORN_DIR)
    os.makedirs(torn, mode=0o700, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    fs.write_file_atomic(torn, f"{name}-{offset}-{stamp}.bin", data)
