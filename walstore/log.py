"""The log: open, append (one or a batch), read from an LSN, watermarks, prune, close.

Several processes may have one log open and append at once; appends from every thread
and process share flushes (group commit, see ``walstore.commit``).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from .attach import Attachment
from .commit import Writer
from .errors import (
    LogAttachError,
    LogClosedError,
    LsnOutOfRangeError,
    RecordTooLargeError,
    WalError,
)
from .forks import ForgetInChild
from .fs import OsFs, prepare_log_dir
from .options import Options, SyncPolicy
from .reader import Reader
from .recovery import load_meta, lost_tails, read_checkpoint, recover, write_checkpoint
from .scan import Record
from .segments import list_segments, read_header
from .shm import WriteState

# close() waits this long for the calls under way (an append waits for a slow disk);
# a call still running then is told the log was closed under it.
CLOSE_WAIT = 10.0

_P = ParamSpec("_P")
_T = TypeVar("_T")


def _open_call(method: Callable[_P, _T]) -> Callable[_P, _T]:
    """A call on an open handle, which close() waits for (see Wal._enter)."""

    @functools.wraps(method)
    def call(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        wal = args[0]
        assert isinstance(wal, Wal)
        wal._enter()
        try:
            return method(*args, **kwargs)
        except Exception as exc:
            wal._closed_under(exc)
            raise
        finally:
            wal._leave()

    return call


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
        self._forked = False  # this process is a child forked while the handle was open
        self._writer: Writer | None = None  # before the registry: a fork may come now
        # Calls under way: close() lets go of the descriptors and the mapping they use only
        # once none is left (a descriptor closed under a leader could be reused by an
        # unrelated file before its pwrite).
        self._calls = 0
        self._calls_lock = threading.Lock()
        self._close_lock = threading.Lock()  # a second close waits for the first
        self._lwm_lock = threading.Lock()
        _handles.add(self)
        prepare_log_dir(self._dir)
        self._att = Attachment(self._dir)
        try:
            self._att.attach(self._recover)
            self._shm = self._att.shm
            self.wal_id = load_meta(self._fs, self._dir, create=False).hex()
            self._wal_id_bytes = bytes.fromhex(self.wal_id)
            self._writer = Writer(
                self._dir, options, self._fs, self._shm, self._att.wlock, self._wal_id_bytes
            )
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

    @property
    def _w(self) -> Writer:
        assert self._writer is not None
        return self._writer

    def _check_active_segment(self) -> None:
        """The shared state describes the segments on disk: its active segment has the
        salt it says (a log repaired or restored under it would not)."""
        for _ in range(3):
            st = self._w.state_snapshot()
            try:
                salt = read_header(self._fs, self._dir, st.active, self._wal_id_bytes).salt
            except FileNotFoundError:
                continue  # rolled over and pruned meanwhile: look again
            if salt == st.salt:
                return
            if self._w.state_snapshot().active == st.active:
                break
        raise LogAttachError(
            f"cannot open the log in {self._dir}: its shared state does not match segment "
            f"{st.active:020d}.seg (was the log repaired or restored while processes had it "
            "open?); stop every process using it, then open it again"
        )

    # ----------------------------------------------------------------- public surface
    def append(self, payload: bytes) -> int:
        """Append one record; returns its LSN once durable (per the sync policy)."""
        if type(payload) is not bytes or len(payload) > self._opts.max_record_bytes:
            return self.append_batch([payload])[0]  # converts, or raises what is wrong
        with self._calls_lock:  # _enter, inlined: the hot path
            if self._closed or self._writer is None:
                self._check_open()
                raise LogClosedError(f"the log in {self._dir} is not open")
            self._calls += 1
        try:
            return self._writer.append([payload]).start
        except Exception as exc:
            self._closed_under(exc)
            raise
        finally:
            with self._calls_lock:
                self._calls -= 1

    @_open_call
    def append_batch(self, payloads: Sequence[bytes]) -> range:
        """Append records atomically in order; returns their LSNs once durable."""
        if not payloads:
            return range(0)
        batch = []
        for p in payloads:
            if not isinstance(p, bytes | bytearray | memoryview):
                raise TypeError(f"payload must be bytes, not {type(p).__name__}")
            # In bytes: len() of a memoryview counts the items of its shape and format.
            size = len(p) if type(p) is bytes else memoryview(p).nbytes
            if size > self._opts.max_record_bytes:
                raise RecordTooLargeError(
                    f"record of {size} bytes exceeds max_record_bytes "
                    f"({self._opts.max_record_bytes}); nothing was appended"
                )
            batch.append(p if type(p) is bytes else bytes(p))
        return self._w.append(batch)

    @_open_call
    def sync(self) -> int:
        """fdatasync everything appended so far, whatever the policy; returns the HWM.
        Appends waiting in the group commit are written too: one whose process died
        while it waited is in the log once this returns, or never will be."""
        return self._w.flush(self._w.state_snapshot().next_lsn, force=True, settle=True)

    @_open_call
    def reader(self, from_lsn: int | None = None) -> Reader:
        """A reader positioned at ``from_lsn`` (default: the low water mark)."""
        start = self.low_water_mark() if from_lsn is None else from_lsn
        if start > self.high_water_mark():
            raise LsnOutOfRangeError(f"LSN {start} is past the high water mark")
        return Reader(self._fs, self._dir, start, self.high_water_mark)

    def iter_from(self, lsn: int) -> Iterator[Record]:
        """Records from ``lsn`` up to the high water mark as of each batch."""
        # The batches are chained in C: no Python frame resumes for each record (a
        # generator yielding each one cost ~1/3 of the iteration, bench/wal.py).
        return itertools.chain.from_iterable(self._batches(lsn))

    def _batches(self, lsn: int) -> Iterator[list[Record]]:
        reader = self.reader(lsn)
        try:
            yield from reader.batches()
        finally:
            reader.close()

    @_open_call
    def lost_tails(self) -> list[int]:
        """Where ``walstore repair`` accepted a lost end of the log (its newest segments
        were missing), oldest first: the records from each LSN on were gone, and those
        LSNs may have been handed out again since, so whatever named a record by such an
        LSN before the repair is stale."""
        return lost_tails(self._fs, self._dir)

    @_open_call
    def first_lsn(self) -> int:
        """The first LSN still on disk (the first segment's)."""
        return list_segments(self._fs, self._dir)[0]

    @_open_call
    def next_lsn(self) -> int:
        """The LSN the next append gets (records below may not be durable yet)."""
        return self._w.state_snapshot().next_lsn

    @_open_call
    def high_water_mark(self) -> int:
        """Every LSN below this is durable; readers never go past it."""
        return self._shm.synced_lsn()

    @_open_call
    def low_water_mark(self) -> int:
        """The persisted checkpoint: every LSN below it is confirmed and may be pruned."""
        return read_checkpoint(self._fs, self._dir)

    @_open_call
    def set_low_water_mark(self, lsn: int) -> int:
        """Persist the low water mark and delete sealed segments wholly below it.

        Returns how many segments were deleted. Never moves the mark backwards and
        never past the high water mark."""
        if type(lsn) is not int:  # bool is an int, and not an LSN
            raise TypeError(f"lsn must be an int, not {type(lsn).__name__}")
        return self._set_low_water_mark(lsn)

    @_open_call
    def status(self) -> Status:
        # Others move every figure meanwhile: read each before those that stay ahead of it
        # (first segment <= low <= high water mark <= next LSN), so that they agree.
        firsts = list_segments(self._fs, self._dir)
        lwm = read_checkpoint(self._fs, self._dir)
        hwm = self._shm.synced_lsn()
        st = self._w.state_snapshot()
        return Status(
            segments=len(firsts),
            bytes=st.sealed_bytes + st.offset,
            first_lsn=firsts[0],
            next_lsn=st.next_lsn,
            low_water_mark=lwm,
            high_water_mark=hwm,
        )

    @property
    @_open_call
    def poisoned(self) -> bool:
        return self._shm.poisoned()

    @property
    def directory(self) -> str:
        return self._dir

    def close(self) -> None:
        """Flush what was written (even with SyncPolicy.NONE) and release everything."""
        if self._forked:
            return  # the parent's handle: let go of at the fork (see _forget_after_fork)
        with self._close_lock:
            if self._closed:
                return
            try:
                if not self._shm.poisoned():
                    self._w.flush(self._w.state_snapshot().next_lsn, force=True)
            finally:
                with self._calls_lock:
                    self._closed = True  # no call starts from now on
                deadline = time.monotonic() + CLOSE_WAIT
                while self._calls and time.monotonic() < deadline:
                    time.sleep(0.001)
                self._release_handles()

    def __enter__(self) -> Wal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._forked:
            raise LogClosedError(
                f"the log in {self._dir} was opened by the parent of this process, before "
                "it forked: open it again in this process"
            )
        if self._closed:
            raise LogClosedError(f"the log in {self._dir} is closed; open it again")

    def _forget_after_fork(self) -> None:
        """In a forked child (no lock taken: its holder may not exist here): the handle is
        closed, and its segment descriptors too; walstore.attach closes the descriptors
        that hold locks."""
        self._forked = self._closed = True
        if self._writer is not None:
            self._writer.forget_fds_after_fork()

    def _enter(self) -> None:
        with self._calls_lock:
            self._check_open()
            self._calls += 1

    def _leave(self) -> None:
        with self._calls_lock:
            self._calls -= 1

    def _closed_under(self, exc: Exception) -> None:
        """A call failed with ``exc``: if the handle was closed under it (close gave up
        waiting for it), that is what broke it, and what it says."""
        if not self._closed or isinstance(exc, WalError):
            return
        raise LogClosedError(
            f"the log in {self._dir} was closed while a call on it was under way (close "
            f"waited {CLOSE_WAIT:g} s for it); an append's records may or may not be in it"
        ) from exc

    # ----------------------------------------------------------------- watermark
    def _set_low_water_mark(self, lsn: int) -> int:
        # One thread of one process at a time, from reading the mark to pruning: two
        # processes each comparing with the mark they read could write it backwards
        # after the other had pruned up to its own.
        with self._lwm_lock:
            self._shm.lock_low_water_mark()
            try:
                return self._move_low_water_mark(lsn)
            finally:
                self._shm.unlock_low_water_mark()

    def _move_low_water_mark(self, lsn: int) -> int:
        current = read_checkpoint(self._fs, self._dir)
        if lsn <= current:
            return 0
        hwm = self._shm.synced_lsn()
        if lsn > hwm:
            raise LsnOutOfRangeError(f"low water mark {lsn} past the high water mark {hwm}")
        if self._opts.sync is SyncPolicy.NONE:
            # Without per-append fsyncs the HWM may be ahead of the disk; a checkpoint
            # past what is durable would make the log refuse to open after a power cut.
            self._w.flush(lsn, force=True)
        try:
            write_checkpoint(self._fs, self._dir, lsn)
        except OSError as exc:
            raise WalError(
                f"could not persist the low water mark {lsn} in {self._dir}: {exc}; "
                f"it stays at {current} (nothing is lost: retry later)"
            ) from exc
        return self._w.prune(lsn)

    # ----------------------------------------------------------------- teardown
    def _release_handles(self) -> None:
        _handles.discard(self)  # closed: nothing of it for a fork to let go of
        if self._writer is not None:
            self._writer.close()
        self._att.close()

    def _abandon(self) -> None:
        """Tests only: drop every handle without flushing, as a killed process would."""
        self._closed = True
        self._release_handles()


_handles = ForgetInChild(Wal._forget_after_fork)
