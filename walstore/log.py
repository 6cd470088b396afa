"""The log: open, append (one or a batch), read from an LSN, watermarks, prune, close.

Several processes may have one log open and append at once. Appends serialise on the
append lock only for a pwrite and a shared-memory update; durability is a separate step
(group commit): the first appender to take the sync lock fdatasyncs once for every record
written so far, and the others find their records already covered.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .attach import Attachment
from .errors import (
    LogAttachError,
    LogClosedError,
    LogFullError,
    LogPoisonedError,
    LsnOutOfRangeError,
    RecordTooLargeError,
    WalError,
)
from .format import SEGMENT_HEADER_SIZE, TYPE_DATA, pack_record
from .fs import OsFs, prepare_log_dir
from .options import Options, SyncPolicy
from .reader import Reader
from .recovery import load_meta, read_checkpoint, recover, recover_tail, write_checkpoint
from .scan import Record
from .segments import create_segment, list_segments, read_header, segment_path
from .shm import INTENT_APPEND, INTENT_NONE, INTENT_ROLL, TornStateError, WriteState

# Commit gates flushes take turns on (see shm.CommitGate): 2 measured 14.6k -> 22-23.7k
# durable appends/s with 16 producers here; 3 or 4 did no better.
GATES = 2


@dataclass(frozen=True)
class Status:
    segments: int
    bytes: int
    first_lsn: int
    next_lsn: int
    low_water_mark: int
    high_water_mark: int

    @property
    def pending(self) -> int:
        """Entries not yet confirmed: next LSN minus the low water mark."""
        return self.next_lsn - self.low_water_mark

    def as_dict(self) -> dict[str, object]:
        """Every field and ``pending``: the keys of ``walstore status --json``."""
        return {**dataclasses.asdict(self), "pending": self.pending}


class Wal:
    """A segmented write-ahead log in one directory. Use ``Wal.open``."""

    def __init__(self, directory: str, options: Options) -> None:
        self._dir = os.path.abspath(directory)
        self._opts = options
        self._fs: OsFs = options.fs if isinstance(options.fs, OsFs) else OsFs()
        self._closed = False
        self._fds: dict[int, int] = {}
        self._fd_lock = threading.Lock()
        self._lwm_lock = threading.Lock()
        prepare_log_dir(self._dir)
        self._att = Attachment(self._dir, GATES)
        try:
            self._att.attach(self._recover)
            self._shm, self._wlock, self._gate = self._att.shm, self._att.wlock, self._att.gate
            self.wal_id = load_meta(self._fs, self._dir, create=False).hex()
            self._wal_id_bytes = bytes.fromhex(self.wal_id)
            self._check_active_segment()
        except BaseException:
            self._release_handles()
            raise

    @classmethod
    def open(cls, directory: str | os.PathLike[str], options: Options | None = None) -> Wal:
        """Open (creating if needed) the log in ``directory``; recovers it if this process
        is the only one that has it open."""
        return cls(os.fspath(directory), options or Options())

    def _recover(self) -> WriteState:
        return recover(self._fs, self._dir, self._opts)[0]

    def _check_active_segment(self) -> None:
        """The shared state describes the segments on disk: its active segment has the
        salt it says (a log repaired or restored under it would not)."""
        for _ in range(3):
            st = self._state_snapshot()
            try:
                salt = read_header(self._fs, self._dir, st.active, self._wal_id_bytes).salt
            except FileNotFoundError:
                continue  # rolled over and pruned meanwhile: look again
            if salt == st.salt:
                return
            if self._state_snapshot().active == st.active:
                break
        raise LogAttachError(
            f"cannot open the log in {self._dir}: its shared state does not match segment "
            f"{st.active:020d}.seg (was the log repaired or restored while processes had it "
            "open?); stop every process using it, then open it again"
        )

    # ----------------------------------------------------------------- public surface
    def append(self, payload: bytes) -> int:
        """Append one record; returns its LSN once durable (per the sync policy)."""
        return self.append_batch([payload])[0]

    def append_batch(self, payloads: Sequence[bytes]) -> range:
        """Append records atomically in order; returns their LSNs once durable."""
        self._check_open()
        return self._append_batch(payloads)

    def sync(self) -> int:
        """fdatasync everything written so far, whatever the policy; returns the HWM."""
        self._check_open()
        return self._flush(self._state_snapshot().next_lsn, force=True)

    def reader(self, from_lsn: int | None = None) -> Reader:
        """A reader positioned at ``from_lsn`` (default: the low water mark)."""
        self._check_open()
        start = self.low_water_mark() if from_lsn is None else from_lsn
        if start > self.high_water_mark():
            raise LsnOutOfRangeError(f"LSN {start} is past the high water mark")
        return Reader(self._fs, self._dir, start, self.high_water_mark)

    def iter_from(self, lsn: int) -> Iterator[Record]:
        """Records from ``lsn`` up to the high water mark as of each batch."""
        reader = self.reader(lsn)
        try:
            # Batches, not ``yield from reader``: one generator less for every record to
            # pass through (~8% faster iteration).
            for batch in reader.batches():
                yield from batch
        finally:
            reader.close()

    def first_lsn(self) -> int:
        """The first LSN still on disk (the first segment's)."""
        self._check_open()
        return list_segments(self._fs, self._dir)[0]

    def next_lsn(self) -> int:
        """The LSN the next append gets (records below may not be durable yet)."""
        self._check_open()
        return self._state_snapshot().next_lsn

    def high_water_mark(self) -> int:
        """Every LSN below this is durable; readers never go past it."""
        self._check_open()
        return self._shm.synced_lsn()

    def low_water_mark(self) -> int:
        """The persisted checkpoint: every LSN below it is confirmed and may be pruned."""
        self._check_open()
        return read_checkpoint(self._fs, self._dir)

    def set_low_water_mark(self, lsn: int) -> int:
        """Persist the low water mark and delete sealed segments wholly below it.

        Returns how many segments were deleted. Never moves the mark backwards and
        never past the high water mark."""
        self._check_open()
        return self._set_low_water_mark(lsn)

    def status(self) -> Status:
        self._check_open()
        firsts = list_segments(self._fs, self._dir)
        st = self._state_snapshot()
        return Status(
            segments=len(firsts),
            bytes=st.sealed_bytes + st.offset,
            first_lsn=firsts[0],
            next_lsn=st.next_lsn,
            low_water_mark=read_checkpoint(self._fs, self._dir),
            high_water_mark=self._shm.synced_lsn(),
        )

    @property
    def poisoned(self) -> bool:
        return self._shm.poisoned()

    @property
    def directory(self) -> str:
        return self._dir

    def close(self) -> None:
        """Flush what was written (even with SyncPolicy.NONE) and release everything."""
        if self._closed:
            return
        try:
            if not self._shm.poisoned():
                self._flush(self._state_snapshot().next_lsn, force=True)
        finally:
            self._closed = True
            self._release_handles()

    def __enter__(self) -> Wal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- append path
    def _check_open(self) -> None:
        if self._closed:
            raise LogClosedError(f"the log in {self._dir} is closed; open it again")

    def _append_batch(self, payloads: Sequence[bytes]) -> range:
        if not payloads:
            return range(0)
        for p in payloads:
            if not isinstance(p, bytes | bytearray | memoryview):
                raise TypeError(f"payload must be bytes, not {type(p).__name__}")
            if len(p) > self._opts.max_record_bytes:
                raise RecordTooLargeError(
                    f"record of {len(p)} bytes exceeds max_record_bytes "
                    f"({self._opts.max_record_bytes}); nothing was appended"
                )
        size = sum(len(p) for p in payloads) + 20 * len(payloads)
        with self._wlock:
            st = self._writable_state()
            roll = st.offset + size > self._opts.segment_bytes and st.offset > SEGMENT_HEADER_SIZE
            # Checked before rolling over, so that a refused append creates nothing.
            self._check_cap(st, size + (SEGMENT_HEADER_SIZE if roll else 0))
            if roll:
                st = self._roll(st)
            lsn = st.next_lsn
            buf = b"".join(
                pack_record(st.salt, lsn + i, bytes(p), TYPE_DATA) for i, p in enumerate(payloads)
            )
            self._shm.set_write(st._replace(intent=INTENT_APPEND, pending_end=st.offset + len(buf)))
            try:
                self._fs.pwrite(self._fd(st.active), buf, st.offset)
            except OSError as exc:
                # Zero whatever part of the batch landed before raising, so that no record
                # of an append that raised can surface when the log is next recovered. If
                # that fails too, the intent stays set and the next holder retries.
                with contextlib.suppress(WalError, OSError):
                    self._writable_state()
                raise self._io_error("write", exc) from exc
            end = lsn + len(payloads)
            self._shm.set_write(
                st._replace(offset=st.offset + len(buf), next_lsn=end, intent=INTENT_NONE)
            )
        self._flush(end, force=False)
        return range(lsn, end)

    def _writable_state(self) -> WriteState:
        """The write state, after cleaning up what a dead appender left (append lock held)."""
        if self._shm.poisoned():
            raise self._poisoned_error()
        try:
            st = self._shm.write_state()
        except TornStateError:
            st = self._rebuild_state()
        if st.intent == INTENT_APPEND:
            fd = self._fd(st.active)
            try:
                # Only up to the file's end: past it nothing landed, and zeroing there
                # could need new blocks on a full disk.
                end = min(st.pending_end, self._fs.fsize(fd))
                self._fs.pwrite(fd, bytes(max(0, end - st.offset)), st.offset)
                self._fs.fdatasync(fd)
            except OSError as exc:
                raise self._io_error("clean-up write", exc) from exc
            st = st._replace(intent=INTENT_NONE, pending_end=0)
            self._shm.set_write(st)
        elif st.intent == INTENT_ROLL:
            st = self._roll(st)
        return st

    def _state_snapshot(self) -> WriteState:
        """The write state, read without the append lock when possible."""
        try:
            return self._shm.write_state_snapshot()
        except TornStateError:
            # A writer was preempted (or died) mid-update: wait for it behind the lock.
            # Safe from the flush leader: no append-lock holder ever waits for the gate.
            with self._wlock:
                try:
                    return self._shm.write_state()
                except TornStateError:
                    return self._rebuild_state()

    def _rebuild_state(self) -> WriteState:
        """A process died while updating the shared state: read it back from disk."""
        firsts = list_segments(self._fs, self._dir)
        newest = firsts[-1]
        salt = read_header(self._fs, self._dir, newest, self._wal_id_bytes).salt
        result = recover_tail(self._fs, self._dir, newest, salt)
        sealed = sum(self._fs.size(segment_path(self._dir, f)) for f in firsts[:-1])
        st = WriteState(newest, salt, INTENT_NONE, result.end, result.next_lsn, sealed, 0)
        self._shm.set_write(st)
        return st

    def _check_cap(self, st: WriteState, size: int) -> None:
        cap = self._opts.max_bytes
        if cap is not None and st.sealed_bytes + st.offset + size > cap:
            raise LogFullError(
                f"the log in {self._dir} holds {st.sealed_bytes + st.offset} bytes and the cap "
                f"is {cap}: nothing was appended; let the pump confirm the backlog or raise "
                "WAL_MAX_BYTES"
            )

    def _roll(self, st: WriteState) -> WriteState:
        """Seal the active segment and start the next one (append lock held)."""
        free = self._fs.free_bytes(self._dir)
        if free < self._opts.segment_bytes + self._opts.min_free_bytes:
            raise LogFullError(
                f"only {free} bytes free on the disk of {self._dir}: not starting a new segment; "
                "nothing was appended. Free disk space, then append again"
            )
        self._shm.set_write(st._replace(intent=INTENT_ROLL))
        old = self._fd(st.active)
        try:
            self._fs.ftruncate(old, st.offset)
            self._fs.fdatasync(old)
        except OSError as exc:
            raise self._io_error("seal", exc) from exc
        try:
            fd, salt = create_segment(
                self._fs,
                self._dir,
                st.next_lsn,
                st.active,
                self._wal_id_bytes,
                self._opts.segment_bytes,
                self._opts.preallocate,
            )
        except OSError as exc:
            if self._fs.exists(segment_path(self._dir, st.next_lsn)):
                # Renamed into place but its directory fsync failed: the new segment may or
                # may not survive a crash, and appending on to the old one would give its
                # LSNs two homes. Only recovery can tell what is on disk.
                raise self._io_error("segment creation", exc) from exc
            self._shm.set_write(st._replace(intent=INTENT_NONE))  # keep appending to the old
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise LogFullError(f"no space for a new segment in {self._dir}: {exc}") from exc
            raise WalError(f"could not create a segment in {self._dir}: {exc}") from exc
        with self._fd_lock:
            self._fds[st.next_lsn] = fd
        new = WriteState(
            st.next_lsn, salt, INTENT_NONE, SEGMENT_HEADER_SIZE, st.next_lsn,
            st.sealed_bytes + st.offset, 0,
        )  # fmt: skip
        self._shm.set_write(new)
        self._forget_fds_below(st.next_lsn)
        return new

    def _flush(self, end: int, force: bool) -> int:
        """Make every LSN below ``end`` durable (group commit); returns the HWM.

        Whoever becomes leader flushes for everyone written so far; the others wait for
        that flush to end and re-check (see shm.CommitGate)."""
        shm, gate = self._shm, self._gate
        spins = 0
        while True:
            synced = shm.synced_lsn()
            if synced >= end and not force:
                return synced
            if gate.try_lead():
                try:
                    return self._lead_flush(end, force)
                finally:
                    gate.end_lead()
            if shm.poisoned():
                raise self._poisoned_error()
            gate.wait()
            # A flush's end wakes every waiter at once; each steps aside once so that the
            # new leader and the append-lock holder are not preempted by the herd
            # (measured: 16 producers ~21.6k -> ~25.7k appends/s; yielding only when the
            # wait did not sleep gained nothing).
            os.sched_yield()
            spins += 1
            if spins % 8 == 0:
                # A new leader may hold the lead lock but not yet the gate (or be
                # preempted in between): let it run instead of spinning on it.
                time.sleep(0.0001)

    def _lead_flush(self, end: int, force: bool) -> int:
        shm = self._shm
        if shm.poisoned():
            raise self._poisoned_error()
        synced = shm.synced_lsn()
        if synced >= end and not force:
            return synced
        always = self._opts.sync is SyncPolicy.ALWAYS
        snap = self._state_snapshot()
        if always or force:
            try:
                self._fs.fdatasync(self._fd(snap.active))
            except OSError as exc:
                raise self._io_error("fsync", exc) from exc
        if shm.poisoned():
            # Another process failed a write or an fsync during ours: the kernel may have
            # dropped pages of this file, so our fsync's success proves nothing (fsyncgate).
            raise self._poisoned_error()
        # Every record below snap.next_lsn was written before the snapshot was taken, and
        # sealed segments were fsync'd when they were sealed.
        synced = max(synced, snap.next_lsn)
        shm.set_synced(synced)
        return synced

    def _poisoned_error(self) -> LogPoisonedError:
        return LogPoisonedError(
            f"the log in {self._dir} is poisoned: an fsync or write failed, so records may "
            "be lost; nothing more is acknowledged until every process using it has closed "
            "it and it is reopened"
        )

    def _io_error(self, what: str, exc: OSError) -> WalError:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT) and what == "write":
            return LogFullError(f"disk full while appending to {self._dir}: {exc}; retry later")
        # fsyncgate: after a failed fsync the kernel may have dropped the dirty pages, so
        # a later "successful" fsync proves nothing. Refuse everything until recovery.
        self._shm.set_poisoned()
        return LogPoisonedError(
            f"{what} failed on the log in {self._dir}: {exc}. The log is poisoned: fix the "
            "disk, stop every process using it and reopen it"
        )

    def _fd(self, first: int) -> int:
        with self._fd_lock:
            fd = self._fds.get(first)
            if fd is None:
                fd = self._fs.open(segment_path(self._dir, first), os.O_RDWR)
                self._fds[first] = fd
            return fd

    def _forget_fds_below(self, first: int) -> None:
        with self._fd_lock:
            for seg in [s for s in self._fds if s < first]:
                self._fs.close(self._fds.pop(seg))

    # ----------------------------------------------------------------- watermark
    def _set_low_water_mark(self, lsn: int) -> int:
        with self._lwm_lock:
            current = read_checkpoint(self._fs, self._dir)
            if lsn <= current:
                return 0
            hwm = self._shm.synced_lsn()
            if lsn > hwm:
                raise LsnOutOfRangeError(f"low water mark {lsn} past the high water mark {hwm}")
            if self._opts.sync is SyncPolicy.NONE:
                # Without per-append fsyncs the HWM may be ahead of the disk; a checkpoint
                # past what is durable would make the log refuse to open after a power cut.
                self._flush(lsn, force=True)
            try:
                write_checkpoint(self._fs, self._dir, lsn)
            except OSError as exc:
                raise WalError(
                    f"could not persist the low water mark {lsn} in {self._dir}: {exc}; "
                    f"it stays at {current} (nothing is lost: retry later)"
                ) from exc
            return self._prune(lsn)

    def _prune(self, lwm: int) -> int:
        # Under the append lock: the byte count is shared state, and a roll-over must not
        # change which segment is active while we decide.
        with self._wlock:
            st = self._writable_state()
            firsts = list_segments(self._fs, self._dir)
            doomed = [f for f, nxt in itertools.pairwise(firsts) if nxt <= lwm]
            doomed = [f for f in doomed if f != st.active]
            freed = 0
            for first in doomed:
                path = segment_path(self._dir, first)
                freed += self._fs.size(path)
                self._fs.unlink(path)
            if doomed:
                self._fs.fsync_dir(self._dir)
                self._shm.set_write(st._replace(sealed_bytes=st.sealed_bytes - freed))
            return len(doomed)

    # ----------------------------------------------------------------- teardown
    def _release_handles(self) -> None:
        with self._fd_lock:
            for fd in self._fds.values():
                self._fs.close(fd)
            self._fds.clear()
        self._att.close()

    def _abandon(self) -> None:
        """Tests only: drop every handle without flushing, as a killed process would."""
        self._closed = True
        self._release_handles()
