"""The on-disk format of a walstore log, in one place.

Directory layout (``WAL_DIR``, created 0700; every file 0600)::

    META                      JSON {"format": 1, "wal_id": "<uuid4 hex>"}; written once
    CHECKPOINT                the persisted low water mark (see below)
    HEAD                      the first LSN of the newest segment ever started (see below)
    LOSSES                    JSON {"lost_tails": [lsn, ...]}: where ``walstore repair``
                              accepted a lost end of the log (LSNs from each were reused)
    00000000000000000000.seg  segments, named by their first LSN: 20 digits, zero padded,
    00000000000000262144.seg  so that names sort in LSN order
    LOCK                      flock(2), taken with the directory's own flock (the attach
                              lock: shared by every open process, exclusive to recover;
                              see walstore.attach)
    append.lock               flock(2): the write lock (appends, group-commit flushes)
    shm                       state shared by the processes that have the log open, and
                              the group-commit slots (mmap'd; never trusted after a
                              crash, rebuilt on recovery; see walstore.shm)
    torn/                     copies of torn tails cut off at recovery, for forensics
    *.tmp                     files being written; never read, removed at recovery

Segment header (64 bytes, little endian)::

    0   8  magic b"WALSEG\\x00\\x01"
    8   4  salt: random per segment; seeds every record CRC of this segment
    12  4  reserved, zero
    16  8  first LSN (must equal the LSN in the file name)
    24  8  first LSN of the previous segment (2**64-1 for the very first): a missing
           middle segment is detected at open from the headers alone, without a scan
    32 16  WAL id (must equal META's: a segment of another log never validates)
    48 12  reserved, zero
    60  4  CRC32C of bytes 0..60

Record (20-byte header, then the payload; records are packed back to back)::

    0   4  CRC32C, seeded with the segment salt, of bytes 4..20 of the header and the payload
    4   4  payload length; at most ``MAX_RECORD_BYTES`` and never past the end of the file
    8   8  LSN: exactly one more than the previous record's (the first: the segment's first LSN)
    16  1  type: 1 = data, 2 = lost (a placeholder written by ``walstore repair``)
    17  1  flags: bit 0 (MORE) = the next record belongs to the same append (a batch);
           zero on a batch's last record, and in every log of an older release
    18  2  reserved, zero

The salt is what keeps stale bytes from validating: a record copied from another segment,
or left over from an older file, has the wrong salt and so the wrong CRC, and its LSN would
have to be exactly the expected one as well.

A segment is *sealed* when the next one exists: it has been fsync'd and truncated to its
last record. The newest segment is *active*: it is pre-filled with zeros up to the segment
size (so that fdatasync after an append need not update the file size), and its valid
records are followed by zeros.

Torn tail: after a crash, the active segment may end in an incomplete or corrupt record
(a write that never became durable). On open, the log is cut back to the last whole
record, provided nothing valid follows; the cut bytes are copied to ``torn/`` first. The
cut goes back to the end of the last whole batch: records with MORE set that are not
followed by the rest of their batch are part of the torn tail (an append is all or none).
The writer never splits a batch between segments; a sealed segment is judged by its LSNs
alone (an early end is corruption, wherever it falls). A bad record anywhere else (a
sealed segment, or followed by a valid record) is corruption: open refuses with the
segment, offset and reason, and ``walstore repair`` is the way past it.

CHECKPOINT (16 bytes): ``<QI4x``: low water mark, then CRC32C of those 8 bytes. It is
replaced atomically (write temp, fsync, rename, fsync directory).

HEAD (16 bytes, as CHECKPOINT): the first LSN of the newest segment, written (atomically,
as CHECKPOINT) once that segment is durable: when the log is created and at each
roll-over. A newest segment on disk older than HEAD means segments at the end were lost
(deleted, or left out of a restore of the segment files): open, status and verify refuse,
where the log would otherwise look whole and shorter. A HEAD behind the newest segment
(a crash between the two writes, or a log of an older release without one) is brought
forward by the next recovery.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Final, NamedTuple

import crc32c

SEGMENT_MAGIC: Final = b"WALSEG\x00\x01"
SEGMENT_HEADER = struct.Struct("<8sI4xQQ16s12xI")
NO_PREVIOUS: Final = 2**64 - 1
SEGMENT_HEADER_SIZE: Final = 64
assert SEGMENT_HEADER.size == SEGMENT_HEADER_SIZE

# crc, length, lsn, type
RECORD_HEADER = struct.Struct("<IIQB3x")
RECORD_HEADER_SIZE: Final = RECORD_HEADER.size
assert RECORD_HEADER_SIZE == 20

TYPE_DATA: Final = 1
TYPE_LOST: Final = 2
VALID_TYPES: Final = frozenset({TYPE_DATA, TYPE_LOST})
FLAGS_OFFSET: Final = 17  # within the record header
FLAG_MORE: Final = 1  # the next record belongs to the same append

# A hard ceiling independent of options: a corrupt length can never make us allocate more.
MAX_RECORD_BYTES: Final = 64 * 1024 * 1024

SEGMENT_SUFFIX: Final = ".seg"
LSN_DIGITS: Final = 20

CHECKPOINT = struct.Struct("<QI4x")

FORMAT_VERSION: Final = 1


# CRC32C (hardware accelerated where the CPU has it) of ``data``, seeded: the library's
# function itself, not a wrapper (an append computes four or more).
crc: Callable[..., int] = crc32c.crc32c


def segment_name(first_lsn: int) -> str:
    return f"{first_lsn:0{LSN_DIGITS}d}{SEGMENT_SUFFIX}"


def parse_segment_name(name: str) -> int | None:
    """The first LSN a segment file name stands for, or None if it is not a segment name."""
    stem, dot, ext = name.partition(".")
    if dot != "." or ext != SEGMENT_SUFFIX[1:] or len(stem) != LSN_DIGITS:
        return None
    if not (stem.isascii() and stem.isdigit()):  # isdigit alone: also "²", Arabic-Indic digits
        return None
    return int(stem)


class SegmentHeader(NamedTuple):
    salt: int
    first_lsn: int
    prev_first_lsn: int
    wal_id: bytes


def pack_segment_header(salt: int, first_lsn: int, prev_first_lsn: int, wal_id: bytes) -> bytes:
    body = SEGMENT_HEADER.pack(SEGMENT_MAGIC, salt, first_lsn, prev_first_lsn, wal_id, 0)[:60]
    return body + struct.pack("<I", crc(body))


def unpack_segment_header(data: bytes) -> SegmentHeader:
    """Decode and verify a segment header; raises ValueError with the reason."""
    if len(data) < SEGMENT_HEADER_SIZE:
        raise ValueError(f"segment header is {len(data)} bytes, expected {SEGMENT_HEADER_SIZE}")
    magic, salt, first_lsn, prev, wal_id, stored = SEGMENT_HEADER.unpack_from(data)
    if magic != SEGMENT_MAGIC:
        raise ValueError(f"bad segment magic {magic!r}")
    if crc(data[:60]) != stored:
        raise ValueError("segment header checksum mismatch")
    return SegmentHeader(salt, first_lsn, prev, wal_id)


_RECORD_TAIL = struct.Struct("<IQBB2x")  # RECORD_HEADER without its checksum, with flags
_CHECKSUM = struct.Struct("<I")


def pack_record(
    salt: int, lsn: int, payload: bytes, rtype: int = TYPE_DATA, flags: int = 0
) -> bytes:
    tail = _RECORD_TAIL.pack(len(payload), lsn, rtype, flags)
    return _CHECKSUM.pack(crc(payload, crc(tail, salt))) + tail + payload


def pack_batch(salt: int, first: int, payloads: list[bytes]) -> list[bytes]:
    """The records of one append: MORE set on every one but the last."""
    last = len(payloads) - 1
    return [pack_record(salt, first + i, bytes(p), TYPE_DATA, FLAG_MORE if i < last else 0)
            for i, p in enumerate(payloads)]  # fmt: skip


def pack_checkpoint(lsn: int) -> bytes:
    raw = struct.pack("<Q", lsn)
    return CHECKPOINT.pack(lsn, crc(raw))


def unpack_checkpoint(data: bytes) -> int:
    if len(data) != CHECKPOINT.size:
        raise ValueError(f"checkpoint is {len(data)} bytes, expected {CHECKPOINT.size}")
    lsn, stored = CHECKPOINT.unpack(data)
    if crc(struct.pack("<Q", lsn)) != stored:
        raise ValueError("checkpoint checksum mismatch")
    return int(lsn)
