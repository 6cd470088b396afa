"""Offline repair: the only way past corruption that open refuses.

Salvages every record that still verifies. Whatever cannot be read is replaced by
*lost* placeholder records (type 2) so LSNs stay contiguous; readers skip them and the
report lists their LSNs so an operator can chase the affected entries. A torn tail of the
newest segment is cut, as open would. Every segment rewritten is first copied, untouched,
to ``repair-<time>/`` in the log directory.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from dataclasses import dataclass, field

from .attach import SHARED_FILES, SHM, AttachLock
from .errors import CorruptLogError, LogBusyError
from .format import (
    FLAG_MORE,
    FLAGS_OFFSET,
    FORMAT_VERSION,
    NO_PREVIOUS,
    RECORD_HEADER,
    SEGMENT_HEADER_SIZE,
    TYPE_LOST,
    VALID_TYPES,
    pack_record,
    pack_segment_header,
    segment_name,
    unpack_segment_header,
)
from .fs import OsFs, check_private_dir
from .recovery import (
    CHECKPOINT,
    HEAD,
    LOSSES,
    META,
    load_meta,
    lost_tails,
    read_checkpoint,
    read_head,
    remove_temp_files,
    write_checkpoint,
    write_head,
)
from .scan import check_record, find_valid_after, last_nonzero_end, scan
from .segments import list_segments, read_header, segment_path
from .shm import SharedState

# The most lost placeholders repair writes in one stretch (20 bytes each: an 80 MiB
# segment): a HEAD or CHECKPOINT further past the end, or a segment named further past the
# one before it, is not believed.
MAX_PLACEHOLDERS = 1 << 22


@dataclass
class RepairReport:
    lost: list[tuple[int, int]] = field(default_factory=list)  # [start, end) LSN ranges
    rewritten: list[str] = field(default_factory=list)
    cut_bytes: int = 0
    backup_dir: str | None = None
    meta_rebuilt: str | None = None  # the WAL id META was rebuilt with (from the headers)
    lwm_lowered: tuple[int, int] | None = None  # (from, to): entries to be delivered again
    lost_tail: int | None = None  # segments at the end were missing: LSNs from here reused
    lost_from: int | None = None  # ...and the records from here on are gone (in LOSSES)

    @property
    def changed(self) -> bool:
        return bool(self.rewritten)


@dataclass
class _Salvage:
    """The records of one segment after salvage: (lsn, type, payload)."""

    first: int
    records: list[tuple[int, int, bytes]]
    end_lsn: int
    damaged: bool


def repair(directory: str, fs: OsFs | None = None) -> RepairReport:
    """Repair the log in ``directory``; it must not be open anywhere (LogBusyError).

    Holds the log exclusively while it runs, and marks the shared state so that a
    process opening the log meanwhile is refused at once (see walstore.attach); the
    shared state is left invalid, so the next open recovers from what repair wrote."""
    fs = fs or OsFs()
    check_private_dir(directory)
    if not fs.exists(os.path.join(directory, META)) and not list_segments(fs, directory):
        raise CorruptLogError(
            META, 0, "META is missing, and no segment header names the log's id: is this a "
            "walstore directory?"
        )  # fmt: skip
    # A directory where a lock or the shared state should be: nobody can have the log
    # open, and those files hold no record; moved aside before the lock is taken.
    report = RepairReport()
    for name in SHARED_FILES:
        path = os.path.join(directory, name)
        if os.path.lexists(path) and not os.path.isfile(path):
            _clear_way(fs, directory, name, report)
            report.rewritten.append(name)  # made again by the next open
    for first in list_segments(fs, directory):
        name = segment_name(first)
        if os.path.isdir(os.path.join(directory, name)):  # holds no record: out of the way
            _clear_way(fs, directory, name, report)
            report.rewritten.append(name)
    lock = AttachLock(directory)
    try:
        if not lock.try_exclusive():
            raise LogBusyError(f"{directory} is open in another process: stop it, then repair")
        shm = SharedState(os.path.join(directory, SHM))
        try:
            shm.mark_repairing(os.getpid())
            return _repair(fs, directory, report)
        finally:
            shm.invalidate()
            shm.close()
    finally:
        lock.close()


def _repair(fs: OsFs, directory: str, report: RepairReport) -> RepairReport:
    remove_temp_files(fs, directory)
    firsts = list_segments(fs, directory)
    try:
        wal_id = load_meta(fs, directory, create=False)
    except CorruptLogError as exc:
        if exc.segment != META:
            raise
        wal_id = _rebuild_meta(fs, directory, firsts, exc.reason, report)
    else:
        carried = _segment_ids(fs, directory, firsts)
        if len(carried) == 1 and wal_id not in carried:
            # Every segment agrees, and META names another log (a META restored from
            # elsewhere): the segments are the log; META is what is wrong. Trusting META
            # turned every record into a lost placeholder.
            problem = f"META names WAL id {wal_id.hex()}, which no segment carries"
            wal_id = _rebuild_meta(fs, directory, firsts, problem, report)
    firsts = _set_aside_strays(fs, directory, firsts, wal_id, report)
    plan: list[_Salvage] = []
    expected = firsts[0] if firsts else 0
    for i, first in enumerate(firsts):
        nxt = firsts[i + 1] if i + 1 < len(firsts) else None
        if first > expected:  # a missing segment: fill its LSNs with placeholders
            _check_stretch(expected, first)
            plan.append(_Salvage(expected, _lost(expected, first), first, True))
            report.lost.append((expected, first))
        elif first < expected:
            raise CorruptLogError(
                segment_name(first), 0, f"overlaps the previous segment (ends at {expected})"
            )
        salvage = _salvage(fs, directory, first, nxt, wal_id, report)
        plan.append(salvage)
        expected = salvage.end_lsn
    _repair_losses(fs, directory, firsts, report)
    expected = _lost_tail(fs, directory, firsts, expected, plan, report)
    if report.lost_from is not None:
        # Before anything is rewritten: a repair stopped after this finds the loss again
        # (HEAD still names the missing segment) and does not record it twice.
        _record_loss(fs, directory, report.lost_from, report)
    prev = NO_PREVIOUS
    for item in plan:
        needs = item.damaged or _prev_of(fs, directory, item.first) != prev
        if needs:
            _rewrite(fs, directory, item, prev, wal_id, report)
        prev = item.first
    fs.fsync_dir(directory)
    first = plan[0].first if plan else 0
    _repair_checkpoint(fs, directory, first, expected, report)
    _repair_head(fs, directory, plan[-1].first if plan else None, report)
    return report


def _repair_losses(fs: OsFs, directory: str, firsts: list[int], report: RepairReport) -> None:
    """LOSSES unreadable: what it said is gone. Start it again from the first LSN on disk,
    so that the key index drops (and re-reads from the log) every row naming a record
    still on disk or later; rows of records pruned before it (confirmed) stay."""
    try:
        lost_tails(fs, directory)
    except CorruptLogError:
        _clear_way(fs, directory, LOSSES, report)
        first = firsts[0] if firsts else 0
        fs.write_file_atomic(directory, LOSSES, json.dumps({"lost_tails": [first]}).encode())
        report.rewritten.append(LOSSES)


def _lost_tail(
    fs: OsFs,
    directory: str,
    firsts: list[int],
    end: int,
    plan: list[_Salvage],
    report: RepairReport,
) -> int:
    """HEAD names a newer segment than any on disk: the end of the log is gone, and how
    many records it held is unknown. LSNs known to have been used (up to HEAD's, and below
    the low water mark: confirmed) become lost placeholders after what is left, or the
    start of a new first segment if nothing is left, so that no confirmed LSN is handed
    out again. Returns the new end of the log; the LSNs from there on may be reused."""
    try:
        head = read_head(fs, directory)
    except CorruptLogError:
        return end  # unreadable: nothing to go by (rewritten by _repair_head)
    if head is None or (firsts and head <= firsts[-1]):
        return end
    try:
        lwm = read_checkpoint(fs, directory)
    except CorruptLogError:
        lwm = 0
    stop = max(head, lwm, end)
    # Records below the low water mark were confirmed; from here on they are gone.
    report.lost_from = min(max(end, lwm), stop)
    if firsts and stop - end > MAX_PLACEHOLDERS:
        name, value = (HEAD, head) if head >= lwm else (CHECKPOINT, lwm)
        raise CorruptLogError(
            name, 0,
            f"{name} says LSN {value}, {value - end} past the end of what is left ({end}): "
            f"more than {MAX_PLACEHOLDERS} placeholders; if {name} is wrong, move it out of "
            "the directory and repair again",
        )  # fmt: skip
    if not firsts:
        plan.append(_Salvage(stop, [], stop, True))  # a new, empty first segment
    elif stop > end:
        plan.append(_Salvage(end, _lost(end, stop), stop, True))
        report.lost.append((end, stop))
    report.lost_tail = stop
    return stop


def _record_loss(fs: OsFs, directory: str, lsn: int, report: RepairReport) -> None:
    """Add ``lsn`` to LOSSES: the records from there on are gone, and their LSNs may be
    handed out again (walrelay's key index drops what it knew of them)."""
    losses = lost_tails(fs, directory)
    if losses and losses[-1] == lsn:
        return  # recorded by a repair that stopped before it was done
    _clear_way(fs, directory, LOSSES, report)
    fs.write_file_atomic(directory, LOSSES, json.dumps({"lost_tails": [*losses, lsn]}).encode())
    report.rewritten.append(LOSSES)


def _repair_head(fs: OsFs, directory: str, newest: int | None, report: RepairReport) -> None:
    """Point HEAD at the newest segment the repaired log has (none: no HEAD)."""
    try:
        head = read_head(fs, directory)
    except CorruptLogError:
        head = -1  # unreadable: rewritten below
    if head == newest:
        return
    _clear_way(fs, directory, HEAD, report)
    if newest is not None:
        write_head(fs, directory, newest)
    elif os.path.lexists(os.path.join(directory, HEAD)):
        fs.unlink(os.path.join(directory, HEAD))
        fs.fsync_dir(directory)
    if newest is None or head is None or (head != -1 and head < newest):
        return  # absent or behind: brought forward as recovery would, not damage
    report.rewritten.append(HEAD)


def _clear_way(fs: OsFs, directory: str, name: str, report: RepairReport) -> None:
    """Move whatever stands where ``name`` is to be written and is not a plain file (a
    directory, a link) into this repair's backup directory: a rename cannot replace it."""
    path = os.path.join(directory, name)
    if not os.path.lexists(path) or (os.path.isfile(path) and not os.path.islink(path)):
        return
    if report.backup_dir is None:
        report.backup_dir = _new_backup_dir(directory)
    os.rename(path, os.path.join(report.backup_dir, name))
    fs.fsync_dir(directory)


def _segment_ids(fs: OsFs, directory: str, firsts: list[int]) -> set[bytes]:
    """The WAL ids the segment headers carry (a damaged header says nothing)."""
    ids: set[bytes] = set()
    for first in firsts:
        fd = fs.open(segment_path(directory, first), os.O_RDONLY)
        try:
            raw = fs.pread(fd, SEGMENT_HEADER_SIZE, 0)
        finally:
            fs.close(fd)
        try:
            ids.add(unpack_segment_header(raw).wal_id)
        except ValueError:
            continue  # a damaged header: the others tell
    return ids


def _rebuild_meta(
    fs: OsFs, directory: str, firsts: list[int], problem: str, report: RepairReport
) -> bytes:
    """Write META again with the WAL id every segment header carries.

    The low water mark is then lowered to the first LSN on disk: whatever damaged META
    may have hit CHECKPOINT's history too, and delivering entries again is safe (they
    are idempotent) where skipping one is not."""
    ids = _segment_ids(fs, directory, firsts)
    if len(ids) > 1:
        raise CorruptLogError(
            META, 0, f"{problem}, and the segments name {len(ids)} different WAL ids: "
            "repair cannot tell which log this is; move the segments of the other log away"
        )  # fmt: skip
    if not ids:  # not even a segment: maybe not a log at all; nothing to guess from
        raise CorruptLogError(META, 0, f"{problem}, and no segment header names the log's id")
    wal_id = ids.pop()
    meta = {"format": FORMAT_VERSION, "wal_id": wal_id.hex()}
    _clear_way(fs, directory, META, report)
    fs.write_file_atomic(directory, META, json.dumps(meta).encode())
    report.rewritten.append(META)
    report.meta_rebuilt = wal_id.hex()
    try:
        lwm = read_checkpoint(fs, directory)
    except CorruptLogError:
        lwm = None  # _repair_checkpoint resets it to the first LSN and says so
    if lwm is not None and lwm > firsts[0]:
        write_checkpoint(fs, directory, firsts[0])
        report.rewritten.append("CHECKPOINT")
        report.lwm_lowered = (lwm, firsts[0])
    return wal_id


def _repair_checkpoint(
    fs: OsFs, directory: str, first: int, end: int, report: RepairReport
) -> None:
    """Keep the low water mark within [first LSN on disk, end of the log]."""
    try:
        lwm = read_checkpoint(fs, directory)
    except CorruptLogError:
        lwm = first  # unreadable: re-deliver everything still on disk (idempotent)
        _clear_way(fs, directory, CHECKPOINT, report)
        write_checkpoint(fs, directory, lwm)
        report.rewritten.append("CHECKPOINT")
        return
    if lwm < first:
        report.lost.append((lwm, first))
    fixed = min(max(lwm, first), end)
    if fixed != lwm:
        write_checkpoint(fs, directory, fixed)
        report.rewritten.append("CHECKPOINT")


def _lost(start: int, end: int) -> list[tuple[int, int, bytes]]:
    return [(lsn, TYPE_LOST, b"") for lsn in range(start, end)]


def _prev_of(fs: OsFs, directory: str, first: int) -> int | None:
    path = segment_path(directory, first)
    if not fs.exists(path):
        return None
    try:
        return unpack_segment_header(fs.read_file(path)[:SEGMENT_HEADER_SIZE]).prev_first_lsn
    except ValueError:
        return None


def _salvage(
    fs: OsFs, directory: str, first: int, nxt: int | None, wal_id: bytes, report: RepairReport
) -> _Salvage:
    buf = fs.read_file(segment_path(directory, first))
    try:
        header = unpack_segment_header(buf[:SEGMENT_HEADER_SIZE])
        if header.first_lsn != first or header.wal_id != wal_id:
            raise ValueError("header does not match")
    except ValueError:
        # Without the salt no record verifies. The newest segment's end is not named by a
        # next segment: follow the records' framing (unverified) to find how many LSNs it
        # used, so that none is handed out again.
        end = nxt if nxt is not None else _framed_end(buf, first)
        _check_stretch(first, end)
        if end > first:
            report.lost.append((first, end))
        return _Salvage(first, _lost(first, end), end, True)
    records: list[tuple[int, int, bytes]] = []
    pos, lsn, damaged = SEGMENT_HEADER_SIZE, first, False
    whole = (pos, 0)  # just past the last record that ends its batch, and records to it
    while pos < len(buf):
        end, rtype, reason = check_record(buf, pos, header.salt, lsn)
        if reason is None:
            records.append((lsn, rtype, buf[pos + 20 : end]))
            more = buf[pos + FLAGS_OFFSET] & FLAG_MORE
            pos, lsn = end, lsn + 1
            if not more:
                whole = (pos, len(records))
            continue
        found = find_valid_after(buf, pos, header.salt, lsn)
        if found is None:
            # Zeros after the records are the newest segment's unused room; a sealed one
            # was cut to its last record, so whatever follows that is damage.
            cut = (len(buf) if nxt is not None else last_nonzero_end(buf, pos)) - pos
            if cut:
                damaged = True
                report.cut_bytes += cut
            break
        damaged = True
        report.lost.append((lsn, found[1]))
        records.extend(_lost(lsn, found[1]))
        pos, lsn = found
        whole = (pos, len(records))
    if nxt is None and whole[1] < len(records):
        # The newest segment ends in an append cut short: its records go with the torn
        # tail, as open cuts them (a batch is all or none; rewritten, they would pass
        # for a whole one).
        damaged = True
        report.cut_bytes += pos - whole[0]
        lsn = records[whole[1]][0]
        del records[whole[1] :]
    if nxt is not None and lsn < nxt:  # the segment's end was lost
        _check_stretch(lsn, nxt)
        damaged = True
        report.lost.append((lsn, nxt))
        records.extend(_lost(lsn, nxt))
        lsn = nxt
    elif nxt is not None and lsn > nxt:
        raise CorruptLogError(segment_name(first), pos, f"runs past the next segment ({nxt})")
    return _Salvage(first, records, lsn, damaged)


def _set_aside_strays(
    fs: OsFs, directory: str, firsts: list[int], wal_id: bytes, report: RepairReport
) -> list[int]:
    """Move into the backup directory every file named like a segment whose header is
    not one of this log's and whose LSNs the segment before it holds, records that
    verify: not a segment of this log but a stray (a copy, a download, garbage), which
    would otherwise make that segment "run past the next one" for good; and such a file
    before the first segment, below the low water mark (its LSNs were confirmed, so
    they are not reported lost). Returns the segments left."""
    try:
        lwm = read_checkpoint(fs, directory)
    except CorruptLogError:
        lwm = 0  # unreadable: nothing is known to be confirmed
    kept: list[int] = []
    for i, first in enumerate(firsts):
        try:
            read_header(fs, directory, first, wal_id)
        except CorruptLogError:
            before = kept[-1] if kept else None
            held = before is not None and _verified_end(fs, directory, before, wal_id) > first
            # Before every segment of the log, and below the low water mark up to the
            # next one: records that were confirmed (pruned), not lost, if it held any.
            nxt = firsts[i + 1] if i + 1 < len(firsts) else None
            confirmed = before is None and nxt is not None and nxt <= lwm
            if held or confirmed:
                _move_aside(fs, directory, segment_name(first), report)
                continue
        kept.append(first)
    return kept


def _verified_end(fs: OsFs, directory: str, first: int, wal_id: bytes) -> int:
    """The LSN after the last record of a segment that verifies (0: its header does not)."""
    try:
        salt = read_header(fs, directory, first, wal_id).salt
    except CorruptLogError:
        return 0
    return scan(fs.read_file(segment_path(directory, first)), SEGMENT_HEADER_SIZE, salt,
                first).next_lsn  # fmt: skip


def _move_aside(fs: OsFs, directory: str, name: str, report: RepairReport) -> None:
    if report.backup_dir is None:
        report.backup_dir = _new_backup_dir(directory)
    os.rename(os.path.join(directory, name), os.path.join(report.backup_dir, name))
    fs.fsync_dir(directory)
    report.rewritten.append(name)


def _check_stretch(start: int, nxt: int) -> None:
    """Refuse to fill [start, nxt) with placeholders when the segment named ``nxt`` is
    further past ``start`` than MAX_PLACEHOLDERS: more likely a stray file than a loss."""
    if nxt - start > MAX_PLACEHOLDERS:
        raise CorruptLogError(
            segment_name(nxt), 0,
            f"starts {nxt - start} LSNs past where the log before it ends ({start}): more "
            f"than {MAX_PLACEHOLDERS} placeholders; if it is not a segment of this log, move "
            "it out of the directory and repair again",
        )  # fmt: skip


def _new_backup_dir(directory: str) -> str:
    """A directory of its own for this repair's originals (mkdir fails if it exists: two
    repairs in the same second must not share one)."""
    base = os.path.join(directory, time.strftime("repair-%Y%m%dT%H%M%S"))
    for n in itertools.count():
        path = base if n == 0 else f"{base}-{n}"
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        os.chmod(path, 0o700)  # whatever the umask
        return path
    raise AssertionError("unreachable")


def _framed_end(buf: bytes, first: int) -> int:
    """The LSN after the last record whose header frames (length, LSN in sequence, type)
    without checking checksums: an upper bound of the LSNs a segment used."""
    pos, lsn = SEGMENT_HEADER_SIZE, first
    while pos + RECORD_HEADER.size <= len(buf):
        _crc, length, rlsn, rtype = RECORD_HEADER.unpack_from(buf, pos)
        end = pos + RECORD_HEADER.size + length
        if rlsn != lsn or rtype not in VALID_TYPES or end > len(buf):
            break
        pos, lsn = end, lsn + 1
    return lsn


def _rewrite(
    fs: OsFs, directory: str, item: _Salvage, prev: int, wal_id: bytes, report: RepairReport
) -> None:
    if report.backup_dir is None:
        report.backup_dir = _new_backup_dir(directory)
    path = segment_path(directory, item.first)
    if fs.exists(path):
        shutil.copy2(path, os.path.join(report.backup_dir, segment_name(item.first)))
    salt = int.from_bytes(os.urandom(4), "little")
    body = [pack_segment_header(salt, item.first, prev, wal_id)]
    body += [pack_record(salt, lsn, payload, rtype) for lsn, rtype, payload in item.records]
    tmp = path + ".tmp"
    fd = fs.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        fs.pwrite(fd, b"".join(body), 0)
        fs.fsync(fd)
    finally:
        fs.close(fd)
    fs.rename(tmp, path)
    report.rewritten.append(segment_name(item.first))
