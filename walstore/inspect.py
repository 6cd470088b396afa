"""Read-only views of a log for operators: status, dump, verify. Never writes: a torn tail
is reported, not cut (the next open of the log cuts it)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from .errors import CorruptLogError, WalError
from .format import SEGMENT_HEADER_SIZE, segment_name
from .fs import OsFs
from .log import Status
from .reader import Reader
from .recovery import load_meta, read_checkpoint
from .scan import Record, find_valid_after, scan
from .segments import check_chain, list_segments, read_header, segment_path
from .shm import SharedState, TornStateError, others_attached


@dataclass(frozen=True)
class Snapshot(Status):
    wal_id: str
    live: bool  # some process has the log open (figures come from its shared state)


def _require_log(directory: str) -> None:
    if not os.path.isdir(directory):
        raise WalError(f"{directory}: no such directory")


def snapshot(directory: str, fs: OsFs | None = None) -> Snapshot:
    """Status of the log without modifying it."""
    fs = fs or OsFs()
    _require_log(directory)
    wal_id = load_meta(fs, directory, create=False)
    firsts = list_segments(fs, directory)
    if not firsts:
        raise WalError(f"{directory}: no segments: is this a walstore directory?")
    sizes = [fs.size(segment_path(directory, f)) for f in firsts]
    live = _live_state(directory)
    if live is not None:
        next_lsn, hwm, total = live
    else:
        header = read_header(fs, directory, firsts[-1], wal_id)
        tail = fs.read_file(segment_path(directory, firsts[-1]))
        result = scan(tail, SEGMENT_HEADER_SIZE, header.salt, firsts[-1])
        next_lsn = hwm = result.next_lsn
        total = sum(sizes[:-1]) + result.end
    return Snapshot(
        wal_id=wal_id.hex(),
        segments=len(firsts),
        bytes=total,
        first_lsn=firsts[0],
        next_lsn=next_lsn,
        low_water_mark=read_checkpoint(fs, directory),
        high_water_mark=hwm,
        live=live is not None,
    )


def _live_state(directory: str) -> tuple[int, int, int] | None:
    """(next LSN, HWM, bytes) from the shared state, if processes have the log open."""
    if not others_attached(os.path.join(directory, "LOCK")):
        return None
    shm = SharedState(os.path.join(directory, "shm"))
    try:
        if not shm.is_valid():
            return None
        st = shm.write_state_snapshot()
        return st.next_lsn, shm.synced_lsn(), st.sealed_bytes + st.offset
    except TornStateError:
        return None
    finally:
        shm.close()


def dump(directory: str, from_lsn: int | None = None, fs: OsFs | None = None) -> Iterator[Record]:
    """Records from ``from_lsn`` (default: the first on disk) to the high water mark."""
    fs = fs or OsFs()
    snap = snapshot(directory, fs)
    reader = Reader(fs, directory, snap.first_lsn if from_lsn is None else from_lsn,
                    lambda: snap.high_water_mark)  # fmt: skip
    try:
        yield from reader
    finally:
        reader.close()


@dataclass
class Problem:
    segment: str
    offset: int
    reason: str
    fatal: bool  # False for a torn tail, which open would cut


@dataclass
class VerifyReport:
    segments: int = 0
    records: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(p.fatal for p in self.problems)


def verify(directory: str, fs: OsFs | None = None) -> VerifyReport:
    """Check every header and every record of every segment."""
    fs = fs or OsFs()
    _require_log(directory)
    report = VerifyReport()
    try:
        wal_id = load_meta(fs, directory, create=False)
        firsts = list_segments(fs, directory)
        headers = check_chain(fs, directory, firsts, wal_id)
        read_checkpoint(fs, directory)
    except CorruptLogError as exc:
        report.problems.append(Problem(exc.segment, exc.offset, exc.reason, True))
        return report
    report.segments = len(firsts)
    for i, first in enumerate(firsts):
        last = i == len(firsts) - 1
        buf = fs.read_file(segment_path(directory, first))
        result = scan(buf, SEGMENT_HEADER_SIZE, headers[first].salt, first)
        report.records += result.n_records
        name = segment_name(first)
        stop = result.stop
        if stop is not None and not (last and stop.zero):
            follows = find_valid_after(buf, stop.offset, headers[first].salt, result.next_lsn)
            torn = last and follows is None
            reason = stop.reason + (" (torn tail: the next open cuts it)" if torn else "")
            report.problems.append(Problem(name, stop.offset, reason, fatal=not torn))
        elif not last and result.next_lsn != firsts[i + 1]:
            report.problems.append(
                Problem(
                    name,
                    result.end,
                    f"ends at LSN {result.next_lsn}, next segment starts at {firsts[i + 1]}",
                    True,
                )
            )
    return report
