"""Bringing a log back to a consistent state from what is on disk (done by the first
process that opens it, alone): leftovers of crashed roll-overs removed, the segment chain
checked from headers alone, and the newest segment's torn tail cut back."""

from __future__ import annotations

import errno
import itertools
import json
import os
import time
import uuid
from collections.abc import Callable
from typing import NamedTuple

from .attach import check_shared_files
from .errors import CorruptLogError, LogFullError
from .format import (
    FORMAT_VERSION,
    NO_PREVIOUS,
    SEGMENT_HEADER_SIZE,
    pack_checkpoint,
    segment_name,
    unpack_checkpoint,
)
from .fs import OsFs, make_private_dirs
from .options import Options
from .scan import Damage, ScanResult, examine, last_nonzero_end
from .segments import check_chain, create_segment, list_segments, segment_path
from .shm import INTENT_NONE, WriteState

META = "META"
CHECKPOINT = "CHECKPOINT"
HEAD = "HEAD"
LOSSES = "LOSSES"
TORN_DIR = "torn"


def read_small(fs: OsFs, directory: str, name: str) -> bytes | None:
    """One of the log's small files (META, CHECKPOINT, HEAD): None if absent; a file that
    cannot be read (a directory in its place, no permission, an I/O error) is damage to
    that file, named as such, like one whose bytes do not check."""
    path = os.path.join(directory, name)
    if not fs.exists(path) and not os.path.islink(path):
        return None
    try:
        return fs.read_file(path)
    except OSError as exc:
        raise CorruptLogError(name, 0, f"{name} cannot be read: {exc.strerror or exc}") from None


def load_meta(fs: OsFs, directory: str, create: bool) -> bytes:
    """The log's 16-byte id, from META (written once, atomically, when absent)."""
    raw = read_small(fs, directory, META)
    if raw is None:
        if not create:
            raise CorruptLogError(META, 0, "META is missing: is this a walstore directory?")
        meta = {"format": FORMAT_VERSION, "wal_id": uuid.uuid4().hex}
        raw = json.dumps(meta).encode()
        fs.write_file_atomic(directory, META, raw)
    try:
        meta = json.loads(raw.decode("utf-8"))
        if not isinstance(meta, dict):
            raise TypeError("not a JSON object")
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"unsupported format {meta.get('format')!r}")
        wal_id = meta.get("wal_id")
        if not isinstance(wal_id, str):
            raise TypeError("no wal_id string")
        return uuid.UUID(hex=wal_id).bytes
    except (ValueError, TypeError, RecursionError) as exc:
        raise CorruptLogError(META, 0, f"unreadable META: {exc}") from None


def read_checkpoint(fs: OsFs, directory: str) -> int:
    raw = read_small(fs, directory, CHECKPOINT)
    if raw is None:
        return 0
    try:
        return unpack_checkpoint(raw)
    except ValueError as exc:
        raise CorruptLogError(CHECKPOINT, 0, str(exc)) from None


def write_checkpoint(fs: OsFs, directory: str, lsn: int) -> None:
    fs.write_file_atomic(directory, CHECKPOINT, pack_checkpoint(lsn))


def read_head(fs: OsFs, directory: str) -> int | None:
    """HEAD: the first LSN of the newest segment ever started (None: not recorded)."""
    raw = read_small(fs, directory, HEAD)
    if raw is None:
        return None
    try:
        return unpack_checkpoint(raw)
    except ValueError as exc:
        raise CorruptLogError(HEAD, 0, str(exc).replace("checkpoint", "HEAD")) from None


def write_head(fs: OsFs, directory: str, first: int) -> None:
    """Record ``first`` as the newest segment's first LSN (that segment is durable)."""
    fs.write_file_atomic(directory, HEAD, pack_checkpoint(first))


def lost_tails(fs: OsFs, directory: str) -> list[int]:
    """LOSSES: where ``walstore repair`` accepted a lost end of the log, oldest first: the
    records from each LSN on were gone, and LSNs from there may have been handed out again
    since."""
    raw = read_small(fs, directory, LOSSES)
    if raw is None:
        return []
    try:
        doc = json.loads(raw.decode("utf-8"))
        found = doc.get("lost_tails") if isinstance(doc, dict) else None
        if not isinstance(found, list) or not all(_is_lsn(n) for n in found):
            raise TypeError("not a list of LSNs")
        return [int(n) for n in found]
    except (ValueError, TypeError, RecursionError) as exc:
        raise CorruptLogError(LOSSES, 0, f"unreadable LOSSES: {exc}") from None


# Past any LSN a log reaches, and what a signed 64-bit integer (SQLite's, the key
# index's) holds.
MAX_LSN = 1 << 63


def _is_lsn(n: object) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and 0 <= n < MAX_LSN


def check_head(fs: OsFs, directory: str, firsts: list[int]) -> int | None:
    """Raise CorruptLogError if segments at the end of the log are missing: the newest
    on disk is older than the newest ever started. Returns HEAD."""
    head = read_head(fs, directory)
    newest = firsts[-1] if firsts else None
    if head is not None and (newest is None or newest < head):
        where = "no segment is left" if newest is None else f"the newest on disk starts at {newest}"
        raise CorruptLogError(
            segment_name(head), 0,
            f"missing: the log's newest segment started at LSN {head} (HEAD), {where}; "
            "records at the end of the log were lost; walstore repair accepts the loss",
        )  # fmt: skip
    return head


def remove_temp_files(fs: OsFs, directory: str) -> None:
    leftovers = [n for n in fs.listdir(directory) if n.endswith(".tmp")]
    for name in leftovers:
        fs.unlink(os.path.join(directory, name))
    if leftovers:
        fs.fsync_dir(directory)


class Survey(NamedTuple):
    """What open finds on disk, before it changes anything (see ``survey``)."""

    wal_id: bytes
    firsts: list[int]  # first LSNs of the segments, ascending
    lwm: int
    salt: int  # the newest segment's
    tail: ScanResult  # the newest segment's records (next_lsn: after any torn tail)
    torn: Damage | None  # a torn tail open cuts; None if the newest segment ends cleanly
    sealed_bytes: int  # bytes in every segment but the newest
    head: int | None  # HEAD (None: not recorded)


TailCheck = Callable[[OsFs, str, int, int], tuple[ScanResult, Damage | None]]


def read_tail(fs: OsFs, directory: str, first: int, salt: int) -> tuple[ScanResult, Damage | None]:
    """The newest segment's verdict, read-only: a torn tail is returned, not cut."""
    result, damage = examine(fs.read_file(segment_path(directory, first)), salt, first, True)
    if damage is not None and not damage.torn:
        raise CorruptLogError(segment_name(first), damage.offset, damage.reason)
    return result, damage


def survey(fs: OsFs, directory: str, tail_check: TailCheck = read_tail) -> Survey:
    """Check a log as open does: META, CHECKPOINT, every segment header and the chain they
    form, the newest segment's records (``tail_check``: read-only by default; recovery's
    cuts a torn tail). Raises CorruptLogError exactly where open would; a torn tail is
    returned, not raised.

    Sealed segments' records are not read: that is verify's (and the reader's) job."""
    check_shared_files(directory)
    firsts = list_segments(fs, directory)
    wal_id = load_meta(fs, directory, create=False)
    lwm = read_checkpoint(fs, directory)
    head = check_head(fs, directory, firsts)
    lost_tails(fs, directory)  # readable, or the log is refused naming it
    if not firsts:
        raise CorruptLogError(META, 0, "no segment: is this a walstore directory?")
    headers = check_chain(fs, directory, firsts, wal_id)
    if firsts[0] > lwm:
        raise CorruptLogError(
            segment_name(firsts[0]), 0, f"segments before it are missing (low water mark {lwm})"
        )
    newest = firsts[-1]
    salt = headers[newest].salt
    tail, damage = tail_check(fs, directory, newest, salt)
    if tail.next_lsn < lwm:
        raise CorruptLogError(
            segment_name(newest),
            tail.end,
            f"log ends at LSN {tail.next_lsn}, below the low water mark {lwm}",
        )
    sealed = sum(fs.size(segment_path(directory, f)) for f in firsts[:-1])
    return Survey(wal_id, firsts, lwm, salt, tail, damage, sealed, head)


def recover(fs: OsFs, directory: str, opts: Options) -> tuple[WriteState, bytes, int]:
    """Recover the log; returns (write state, WAL id, low water mark)."""
    remove_temp_files(fs, directory)
    if not list_segments(fs, directory):
        # The floor every roll-over keeps (walstore.writer), before anything is written.
        free = fs.free_bytes(directory)
        if free < opts.segment_bytes + opts.min_free_bytes:
            raise LogFullError(
                f"only {free} bytes free on the disk of {directory}: not creating the log's "
                f"first segment ({opts.segment_bytes} bytes, and {opts.min_free_bytes} kept "
                "free). Free disk space, or lower WAL_SEGMENT_BYTES"
            )
        # Only a new log gets an id: segments without META mean damage, and a fresh id
        # would make every one of them fail validation for good.
        wal_id = load_meta(fs, directory, create=True)
        check_head(fs, directory, [])  # every segment deleted: not a new log
        lwm = read_checkpoint(fs, directory)
        if lwm:
            raise CorruptLogError(CHECKPOINT, 0, f"low water mark {lwm} but no segment exists")
        try:
            fd, salt = create_segment(
                fs, directory, 0, NO_PREVIOUS, wal_id, opts.segment_bytes, opts.preallocate
            )
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise LogFullError(f"no space for the first segment in {directory}: {exc}") from exc
            raise
        fs.close(fd)
        write_head(fs, directory, 0)
        return WriteState(0, salt, INTENT_NONE, SEGMENT_HEADER_SIZE, 0, 0, 0), wal_id, 0
    found = survey(fs, directory, cut_tail)
    if found.head is None or found.head < found.firsts[-1]:
        write_head(fs, directory, found.firsts[-1])  # a crash mid-roll, or an older release
    # The crashed process may have renamed or unlinked files (a new segment, CHECKPOINT,
    # a prune) and died before its directory fsync: make the directory as we found it
    # durable before anything in it counts as below the high water mark.
    fs.fsync_dir(directory)
    end, next_lsn = found.tail.end, found.tail.next_lsn
    state = WriteState(found.firsts[-1], found.salt, INTENT_NONE, end, next_lsn,
                       found.sealed_bytes, 0)  # fmt: skip
    return state, found.wal_id, found.lwm


def recover_tail(fs: OsFs, directory: str, first: int, salt: int) -> ScanResult:
    """Scan the newest segment; cut a torn tail (after copying it aside); fsync.

    Raises CorruptLogError if a bad record is followed by a valid one."""
    return cut_tail(fs, directory, first, salt)[0]


def cut_tail(fs: OsFs, directory: str, first: int, salt: int) -> tuple[ScanResult, Damage | None]:
    """``recover_tail``, also returning the torn tail it cut (None if there was none)."""
    name = segment_name(first)
    fd = fs.open(segment_path(directory, first), os.O_RDWR)
    try:
        buf = fs.pread(fd, fs.fsize(fd), 0)
        result, damage = examine(buf, salt, first, newest=True)
        if damage is not None:
            if not damage.torn:
                raise CorruptLogError(name, damage.offset, damage.reason)
            cut_end = last_nonzero_end(buf, damage.offset)
            _save_torn(fs, directory, name, damage.offset, buf[damage.offset : cut_end])
            # Zeros rather than ftruncate: the segment stays preallocated.
            fs.pwrite(fd, bytes(cut_end - damage.offset), damage.offset)
        # What we scanned may have been only in the page cache (a process crash, not a
        # power cut): make it durable before it counts as below the high water mark.
        fs.fdatasync(fd)
        return result, damage
    finally:
        fs.close(fd)


def _save_torn(fs: OsFs, directory: str, name: str, offset: int, data: bytes) -> None:
    """Copy a torn tail aside before it is cut, under a name no other cut reuses (the
    recovering process is alone, so the first free name stays free)."""
    torn = os.path.join(directory, TORN_DIR)
    make_private_dirs(torn)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    base = f"{name}-{offset}-{stamp}"
    for n in itertools.count():
        file = f"{base}.bin" if n == 0 else f"{base}-{n}.bin"
        if not fs.exists(os.path.join(torn, file)):
            fs.write_file_atomic(torn, file, data)
            return
