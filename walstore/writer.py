"""The write side of a log below group commit: the shared write state (read, cleaned up
after a writer that died, rebuilt if damaged), roll-over to a new segment, prune, the
segment descriptors of this process, and what an I/O error means (LogFullError, or
poison). Every method that changes anything runs under the write lock.

The intent protocol: a writer sets an *intent* in the shared state before it writes or
rolls over, and clears it after. A writer killed in between leaves the intent set; the
next holder of the write lock zeroes what the dead one may have written (no half record,
no half batch mid-log) or finishes its roll-over (``writable_state``).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import threading

from .errors import LogFullError, LogPoisonedError, WalError
from .format import SEGMENT_HEADER_SIZE
from .fs import OsFs
from .options import Options
from .recovery import recover_tail, write_head
from .segments import create_segment, list_segments, read_header, segment_path
from .shm import (
    INTENT_APPEND,
    INTENT_NONE,
    INTENT_ROLL,
    SLOT_FAILED,
    SharedState,
    TornStateError,
    WriteLock,
    WriteState,
)

ERR_UNKNOWN = 3  # a slot's error: the shared state was damaged while it was in a batch


class SegmentWriter:
    """The shared write state and the segments, for one ``Wal`` handle."""

    def __init__(
        self,
        directory: str,
        options: Options,
        fs: OsFs,
        shm: SharedState,
        wlock: WriteLock,
        wal_id: bytes,
    ) -> None:
        self._dir, self._opts, self._fs = directory, options, fs
        self._shm, self._wlock, self._wal_id = shm, wlock, wal_id
        self._fds: dict[int, int] = {}
        self._fd_lock = threading.Lock()

    # ----------------------------------------------------------------- shared state
    def writable_state(self) -> WriteState:
        """The write state, after cleaning up what a dead writer left (write lock held)."""
        if self._shm.poisoned():
            raise self.poisoned_error()
        try:
            st = self._shm.write_state(dead_writer=self._wlock.inherited)
        except TornStateError:
            st = self._rebuild_state()
        if st.intent == INTENT_APPEND:
            fd = self.fd(st.active)
            try:
                # Only up to the file's end: past it nothing landed, and zeroing there
                # could need new blocks on a full disk.
                end = min(st.pending_end, self._fs.fsize(fd))
                self._fs.pwrite(fd, bytes(max(0, end - st.offset)), st.offset)
                self._fs.fdatasync(fd)
            except OSError as exc:
                raise self.io_error("clean-up write", exc) from exc
            st = st._replace(intent=INTENT_NONE, pending_end=0)
            self._shm.set_write(st)
        elif st.intent == INTENT_ROLL:
            st = self._roll(st)
        return st

    def state_snapshot(self) -> WriteState:
        """The write state, read without the write lock when possible."""
        try:
            return self._shm.write_state_snapshot()
        except TornStateError:
            with self._wlock:  # a writer was preempted between two updates: wait for it
                try:
                    return self._shm.write_state(dead_writer=self._wlock.inherited)
                except TornStateError:
                    return self._rebuild_state()

    def _rebuild_state(self) -> WriteState:
        """The shared write state is unreadable (damaged): read it back from disk. Slots
        in a batch may or may not be in the log: their producers are told so."""
        firsts = list_segments(self._fs, self._dir)
        newest = firsts[-1]
        salt = read_header(self._fs, self._dir, newest, self._wal_id).salt
        result = recover_tail(self._fs, self._dir, newest, salt)
        sealed = sum(self._fs.size(segment_path(self._dir, f)) for f in firsts[:-1])
        for slot in range(self._shm.slots_hint()):
            batch, payloads = self._shm.ready_slot(slot)
            if payloads is not None and batch:
                self._shm.set_slot_state(slot, SLOT_FAILED, ERR_UNKNOWN)
        st = WriteState(newest, salt, INTENT_NONE, result.end, result.next_lsn, sealed, 0, 0)
        self._shm.set_write(st)
        return st

    def _check_cap(self, st: WriteState, size: int) -> WriteState:
        """``st``, or LogFullError if ``size`` more bytes would pass the cap. Before it
        says full, the sealed bytes are counted again on disk (returned in the state)."""
        cap = self._opts.max_bytes
        if cap is None or st.sealed_bytes + st.offset + size <= cap:
            return st
        st = self._recount(st, list_segments(self._fs, self._dir))
        if st.sealed_bytes + st.offset + size > cap:
            raise LogFullError(
                f"the log in {self._dir} holds {st.sealed_bytes + st.offset} bytes and the cap "
                f"is {cap}: nothing was appended; let the pump confirm the backlog or raise "
                "WAL_MAX_BYTES"
            )
        return st

    def _recount(self, st: WriteState, firsts: list[int]) -> WriteState:
        """The state with the bytes of the sealed segments among ``firsts`` (the segments
        on disk) counted (write lock held): a process killed while it pruned, between
        deleting segments and lowering the shared count, leaves the count too high."""
        sealed = sum(self._fs.size(segment_path(self._dir, f)) for f in firsts if f < st.active)
        if sealed != st.sealed_bytes:
            st = st._replace(sealed_bytes=sealed)
            self._shm.set_write(st)
        return st

    def _roll(self, st: WriteState) -> WriteState:
        """Seal the active segment and start the next one (write lock held)."""
        free = self._fs.free_bytes(self._dir)
        if free < self._opts.segment_bytes + self._opts.min_free_bytes:
            raise LogFullError(
                f"only {free} bytes free on the disk of {self._dir}: not starting a new segment; "
                "nothing was appended. Free disk space, then append again"
            )
        self._shm.set_write(st._replace(intent=INTENT_ROLL))
        old = self.fd(st.active)
        try:
            self._fs.ftruncate(old, st.offset)
            self._fs.fdatasync(old)
        except OSError as exc:
            raise self.io_error("seal", exc) from exc
        try:
            fd, salt = create_segment(
                self._fs,
                self._dir,
                st.next_lsn,
                st.active,
                self._wal_id,
                self._opts.segment_bytes,
                self._opts.preallocate,
            )
        except OSError as exc:
            if self._fs.exists(segment_path(self._dir, st.next_lsn)):
                # Renamed into place but its directory fsync failed: the new segment may or
                # may not survive a crash, and appending on to the old one would give its
                # LSNs two homes. Only recovery can tell what is on disk.
                raise self.io_error("segment creation", exc) from exc
            self._shm.set_write(st._replace(intent=INTENT_NONE))  # keep appending to the old
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise LogFullError(f"no space for a new segment in {self._dir}: {exc}") from exc
            raise WalError(f"could not create a segment in {self._dir}: {exc}") from exc
        with self._fd_lock:
            self._fds[st.next_lsn] = fd
        new = WriteState(
            st.next_lsn, salt, INTENT_NONE, SEGMENT_HEADER_SIZE, st.next_lsn,
            st.sealed_bytes + st.offset, 0, st.last_batch,
        )  # fmt: skip
        self._shm.set_write(new)
        # Before any record goes into it: from now on its loss is detected. A HEAD left
        # behind (this write failed) only weakens that check until the next recovery,
        # which brings HEAD forward; not worth failing the append for.
        with contextlib.suppress(OSError):
            write_head(self._fs, self._dir, st.next_lsn)
        # Every user of a segment descriptor holds the write lock (as we do): none is in
        # use by another thread of this process.
        self.forget_fds_below(st.next_lsn)
        return new

    def prune(self, lwm: int) -> int:
        """Delete the sealed segments wholly below ``lwm``; returns how many."""
        # Under the write lock: the byte count is shared state, and a roll-over must not
        # change which segment is active while we decide.
        with self._wlock:
            st = self.writable_state()
            firsts = list_segments(self._fs, self._dir)
            doomed = [f for f, nxt in itertools.pairwise(firsts) if nxt <= lwm]
            doomed = [f for f in doomed if f != st.active]
            for first in doomed:
                self._fs.unlink(segment_path(self._dir, first))
            if doomed:
                self._fs.fsync_dir(self._dir)
            # Counted, not lowered by what it freed, and even when nothing was left to
            # delete: a pruner killed before it lowered the count left it too high.
            self._recount(st, [f for f in firsts if f not in doomed])
            return len(doomed)

    # ----------------------------------------------------------------- errors, files
    def poisoned_error(self) -> LogPoisonedError:
        return LogPoisonedError(
            f"the log in {self._dir} is poisoned: an fsync or write failed, so records may "
            "be lost; nothing more is acknowledged until every process using it has closed "
            "it and it is reopened"
        )

    def io_error(self, what: str, exc: OSError) -> WalError:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT) and what == "write":
            return LogFullError(f"disk full while appending to {self._dir}: {exc}; retry later")
        # fsyncgate: after a failed fsync the kernel may have dropped the dirty pages, so
        # a later "successful" fsync proves nothing. Refuse everything until recovery.
        self._shm.set_poisoned()
        return LogPoisonedError(
            f"{what} failed on the log in {self._dir}: {exc}. The log is poisoned: fix the "
            "disk, stop every process using it and reopen it"
        )

    def fd(self, first: int) -> int:
        fd = self._fds.get(first)  # a dict lookup is atomic: the lock is for misses
        if fd is not None:
            return fd
        with self._fd_lock:
            fd = self._fds.get(first)
            if fd is None:
                fd = self._fs.open(segment_path(self._dir, first), os.O_RDWR)
                self._fds[first] = fd
            return fd

    def forget_fds_below(self, first: int) -> None:
        with self._fd_lock:
            for seg in [s for s in self._fds if s < first]:
                self._fs.close(self._fds.pop(seg))

    def close(self) -> None:
        with self._fd_lock:
            for fd in self._fds.values():
                self._fs.close(fd)
            self._fds.clear()

    def forget_fds_after_fork(self) -> None:
        """In a forked child: close the inherited segment descriptors (without the lock,
        which a thread of the parent may have held at the fork)."""
        for fd in list(self._fds.values()):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
