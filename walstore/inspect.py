"""Read-only views of a log for operators: status, dump, verify. Never writes the log: a
torn tail is reported, not cut (the next open cuts it).

Every one of them gives the verdict open gives on the same bytes (``recovery.survey``):
a log open refuses is refused here too, with the same segment, offset and reason, never
shown as a shorter valid log. ``verify`` also reads every sealed segment's records, as
the reader (and so ``dump``) does when it gets there. See docs/walstore-damage.md.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from .attach import SHM, others_attached
from .errors import CorruptLogError, LogAttachError, LsnOutOfRangeError, WalError
from .format import segment_name
from .fs import OsFs
from .log import Status
from .reader import Reader
from .recovery import CHECKPOINT, HEAD, load_meta, read_checkpoint, survey
from .scan import Record, examine
from .segments import list_segments, read_header, segment_path
from .shm import SharedState, TornStateError


@dataclass
class Problem:
    segment: str
    offset: int
    reason: str
    fatal: bool  # False for a torn tail, which open would cut

    def __str__(self) -> str:
        return f"segment {self.segment} offset {self.offset}: {self.reason}"


@dataclass(frozen=True)
class Snapshot(Status):
    wal_id: str
    live: bool  # some process has the log open (figures come from its shared state)
    # A torn tail of the newest segment that the next open cuts (not part of the figures;
    # never in the JSON of ``walstore status``, which the CLI contract fixes).
    torn_tail: Problem | None = None

    def as_dict(self) -> dict[str, object]:
        doc = super().as_dict()
        doc.pop("torn_tail", None)
        return doc


def _require_log(directory: str) -> None:
    if not os.path.isdir(directory):
        raise WalError(f"{directory}: no such directory")


def snapshot(directory: str, fs: OsFs | None = None) -> Snapshot:
    """Status of the log without modifying it.

    If processes have the log open, the figures are theirs (the shared state). If not,
    the log is checked as open would check it, and CorruptLogError raised where open
    would raise it."""
    fs = fs or OsFs()
    _require_log(directory)
    for attempt in range(1, LIVE_ATTEMPTS + 1):
        before = _disk_mark(directory)
        try:
            return _snapshot_once(fs, directory)
        except (CorruptLogError, FileNotFoundError, LogAttachError):
            # (LogAttachError: the shared state read while a process rebuilt it.)
            if attempt == LIVE_ATTEMPTS or not _changed(directory, before):
                raise
    raise AssertionError("unreachable")


def _snapshot_once(fs: OsFs, directory: str) -> Snapshot:
    # Read before the shared state, for the figures to agree (see Wal.status); what is
    # wrong with them is reported by the checks below when nobody has the log open.
    try:
        early: tuple[list[int], int] | None = (
            list_segments(fs, directory),
            read_checkpoint(fs, directory),
        )
    except (WalError, OSError):
        early = None
    live = _live_state(directory)
    if live is not None:
        firsts, lwm = early or (list_segments(fs, directory), read_checkpoint(fs, directory))
        # As survey says of a closed log. Never a prune's doing: prunes stay below the
        # mark, and the mark was read after the listing, so it can only be further on.
        if firsts and firsts[0] > lwm:
            why = f"segments before it are missing (low water mark {lwm})"
            raise CorruptLogError(segment_name(firsts[0]), 0, why)
        next_lsn, hwm, total = live
        return Snapshot(
            wal_id=load_meta(fs, directory, create=False).hex(),
            segments=len(firsts),
            bytes=total,
            first_lsn=firsts[0] if firsts else next_lsn,
            next_lsn=next_lsn,
            low_water_mark=lwm,
            high_water_mark=hwm,
            live=True,
        )
    found = survey(fs, directory)
    torn = None
    if found.torn is not None:
        name = segment_name(found.firsts[-1])
        reason = f"{found.torn.reason} (torn tail: the next open cuts it)"
        torn = Problem(name, found.torn.offset, reason, fatal=False)
    return Snapshot(
        wal_id=found.wal_id.hex(),
        segments=len(found.firsts),
        bytes=found.sealed_bytes + found.tail.end,
        first_lsn=found.firsts[0],
        next_lsn=found.tail.next_lsn,
        low_water_mark=found.lwm,
        high_water_mark=found.tail.next_lsn,
        live=False,
        torn_tail=torn,
    )


def _live_state(directory: str) -> tuple[int, int, int] | None:
    """(next LSN, HWM, bytes) from the shared state, if processes have the log open;
    None if nobody has."""
    if not others_attached(directory):
        return None
    shm = SharedState(os.path.join(directory, SHM))
    try:
        ids = shm.identities()
        if not shm.is_valid() or not ids or ids[0] != shm.identity():
            raise LogAttachError(
                f"processes have the log in {directory} open, but its shared state file "
                f"{SHM} is not theirs: it was removed or replaced while they ran, so their "
                "figures cannot be read; stop them all (or wait until they close it)"
            )
        hwm = shm.synced_lsn()  # before the next LSN, which stays ahead of it
        for _ in range(100):
            try:
                st = shm.write_state_snapshot()
            except TornStateError:  # a writer was preempted mid-update: ask again
                time.sleep(0.001)
                continue
            return st.next_lsn, hwm, st.sealed_bytes + st.offset
        return None  # a writer died mid-update: read the disk
    finally:
        shm.close()


def dump(
    directory: str,
    from_lsn: int | None = None,
    fs: OsFs | None = None,
    snap: Snapshot | None = None,
) -> Iterator[Record]:
    """Records from ``from_lsn`` (default: the first on disk) to the high water mark.

    Raises CorruptLogError (after yielding every record before it) where the records
    stop verifying, as the pump's reader does. Records pruned while it runs (confirmed,
    and deleted by another process) are skipped: it goes on from the first left. A
    ``from_lsn`` no longer in the log when it starts, or past its high water mark, raises
    LsnOutOfRangeError."""
    fs = fs or OsFs()
    snap = snap or snapshot(directory, fs)
    hwm = snap.high_water_mark
    lsn = snap.first_lsn if from_lsn is None else from_lsn
    if lsn > hwm:  # as Wal.reader: nothing there yet is not the end of what is there
        raise LsnOutOfRangeError(f"LSN {lsn} is past the high water mark {hwm}")
    while True:
        reader = Reader(fs, directory, lsn, lambda: hwm)
        try:
            for record in reader:
                lsn = record[0] + 1
                yield record
            return
        except LsnOutOfRangeError:
            if lsn == from_lsn:  # asked for, and gone before a record was read
                raise
            firsts = list_segments(fs, directory)
            if not firsts or firsts[0] <= lsn:  # not a prune: something else is wrong
                raise
            lsn = firsts[0]  # every LSN below it was confirmed and deleted meanwhile
            if lsn >= hwm:
                return
        finally:
            reader.close()


@dataclass
class VerifyReport:
    segments: int = 0
    records: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(p.fatal for p in self.problems)


# A log that other processes append to and prune may change between two of verify's
# reads (a roll-over after the listing, a segment pruned before it is read): with them
# attached, what looks like damage is looked at again from the start, this often.
LIVE_ATTEMPTS = 3


def verify(directory: str, fs: OsFs | None = None) -> VerifyReport:
    """Check everything open checks, then every record of every sealed segment."""
    fs = fs or OsFs()
    _require_log(directory)
    for attempt in range(1, LIVE_ATTEMPTS + 1):
        before = _disk_mark(directory)
        try:
            report = _verify_once(fs, directory)
        except FileNotFoundError:
            if attempt < LIVE_ATTEMPTS and _changed(directory, before):
                continue
            raise
        if report.ok or attempt == LIVE_ATTEMPTS or not _changed(directory, before):
            break
    return report


def _disk_mark(directory: str) -> tuple[object, ...]:
    """What a roll-over, a prune or a new HEAD or CHECKPOINT changes: the directory's
    names, and HEAD's and CHECKPOINT's identity (each is replaced by a rename)."""
    marks: list[object] = [tuple(sorted(os.listdir(directory)))]
    for name in (HEAD, CHECKPOINT):
        try:
            st = os.stat(os.path.join(directory, name))
            marks.append((st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            marks.append(None)
    return tuple(marks)


def _changed(directory: str, before: tuple[object, ...]) -> bool:
    """What looked like damage may be a change made between two reads: the files moved
    on since ``before``, or processes have the log open (a live log moves on)."""
    return _disk_mark(directory) != before or others_attached(directory)


def _pruned(fs: OsFs, directory: str, first: int) -> bool:
    """The segment of ``first`` went from the front of the log, below the low water mark:
    pruned (its records were confirmed), not lost."""
    now = list_segments(fs, directory)
    return bool(now) and now[0] > first and read_checkpoint(fs, directory) >= now[0]


def _verify_once(fs: OsFs, directory: str) -> VerifyReport:
    report = VerifyReport()
    try:
        found = survey(fs, directory)
    except CorruptLogError as exc:
        report.segments = len(list_segments(fs, directory))
        report.problems.append(Problem(exc.segment, exc.offset, exc.reason, True))
        return report
    firsts = found.firsts
    report.segments = len(firsts)
    for i, first in enumerate(firsts[:-1]):
        name = segment_name(first)
        try:
            salt = read_header(fs, directory, first, found.wal_id).salt
            data = fs.read_file(segment_path(directory, first))
        except FileNotFoundError:
            if _pruned(fs, directory, first):
                report.segments -= 1  # confirmed and deleted since the listing
                continue
            raise
        result, damage = examine(data, salt, first, False)
        report.records += result.n_records
        if damage is not None:
            report.problems.append(Problem(name, damage.offset, damage.reason, True))
        elif result.next_lsn != firsts[i + 1]:
            reason = f"ends at LSN {result.next_lsn}, next segment starts at {firsts[i + 1]}"
            report.problems.append(Problem(name, result.end, reason, True))
    report.records += found.tail.n_records
    if found.torn is not None:
        reason = f"{found.torn.reason} (torn tail: the next open cuts it)"
        report.problems.append(Problem(segment_name(firsts[-1]), found.torn.offset, reason, False))
    return report
