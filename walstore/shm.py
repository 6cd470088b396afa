"""State shared by every process that has one log open, and the locks that guard it.

The state lives in an mmap'd file (``shm`` in the log's directory), like SQLite's
``-shm``: it is a cache of what the segments say, never trusted after a crash. The first
process to open the log (the one that gets the attach lock exclusively) rebuilds it from
disk; later ones attach to it.

Two regions, each with its own lock so appenders and the group-commit flusher do not
serialise on each other:
- the write region (append lock): active segment, its salt, the append offset, the next
  LSN, bytes in sealed segments, and an *intent* that says an append or a roll-over was
  started; a process killed inside the append lock leaves the intent set and the next
  holder cleans up after it (so a half record never ends up in the middle of the log).
- the sync region (sync lock): the high water mark (every LSN below it is durable) and
  the poisoned flag (an fsync failed; nothing more is acknowledged).
- the flush sequence number (written by the flush leader): which commit gate the flush
  in progress uses (see CommitGate).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import threading
from types import TracebackType
from typing import NamedTuple

from .format import crc
from .fs import open_private

SHM_SIZE = 4096
# Version 2: identities of the shared files (see walstore.attach). A process of the
# previous release finds the magic unknown and does not attach.
_MAGIC = b"WALSHM\x00\x02"
_REPAIR_MAGIC = b"WALRPR\x00\x02"  # walstore repair runs; the generation field is its pid
_HEAD = struct.Struct("<8sQ")  # magic, generation
_WRITE = struct.Struct("<QIIQQQQI")  # +crc
_WRITE_OFF = 64
_SYNC = struct.Struct("<QI")  # synced_lsn (high water mark), poisoned
_SYNCED, _POISONED = struct.Struct("<Q"), struct.Struct("<I")  # its fields, written apart
_SYNC_OFF = 192
_SEQ = struct.Struct("<Q")  # flush sequence number: picks the commit gate (CommitGate)
_SEQ_OFF = 256

_IDS_OFF = 320  # the identities of the shared files: count, then (st_dev, st_ino) each
_IDS_COUNT = struct.Struct("<I")
_ID = struct.Struct("<QQ")
_MAX_IDS = 32

INTENT_NONE = 0
INTENT_APPEND = 1  # bytes [offset, pending_end) may hold a partial write of a dead process
INTENT_ROLL = 2  # a roll-over to a new segment at next_lsn was started


class WriteState(NamedTuple):
    active: int  # first LSN of the active segment
    salt: int  # the active segment's salt
    intent: int
    offset: int  # where the next record goes in the active segment
    next_lsn: int
    sealed_bytes: int  # bytes in every segment but the active one
    pending_end: int  # with INTENT_APPEND: end of the region being written


class TornStateError(Exception):
    """The write region failed its checksum: a process died while updating it."""


def file_identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def repairing_pid(path: str) -> int | None:
    """The pid of a ``walstore repair`` running on the log whose shared state is at
    ``path``, or None (none marked, or the one marked is dead)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        magic, pid = _HEAD.unpack(os.pread(fd, _HEAD.size, 0).ljust(_HEAD.size, b"\0"))
    finally:
        os.close(fd)
    if magic != _REPAIR_MAGIC or not 0 < pid < 2**31:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, someone else's
    return int(pid)


class SharedState:
    def __init__(self, path: str) -> None:
        self._fd = open_private(path, os.O_RDWR | os.O_CREAT)
        try:
            if os.fstat(self._fd).st_size < SHM_SIZE:
                os.ftruncate(self._fd, SHM_SIZE)
            self._mm = mmap.mmap(self._fd, SHM_SIZE)
        except BaseException:
            os.close(self._fd)
            raise

    def close(self) -> None:
        self._mm.close()
        os.close(self._fd)

    def identity(self) -> tuple[int, int]:
        """(device, inode) of the file this process mapped."""
        return file_identity(self._fd)

    # -- whole-state lifecycle (only under the exclusive attach lock) --
    def initialise(
        self, state: WriteState, synced_lsn: int, identities: list[tuple[int, int]]
    ) -> None:
        """A fresh state, built from disk by recovery. ``identities``: the (device,
        inode) of this file and of every lock file the recovering process opened; a
        process attaches only if its own files are these (see walstore.attach)."""
        if len(identities) > _MAX_IDS:
            raise ValueError(f"at most {_MAX_IDS} shared files")
        self._mm[:SHM_SIZE] = bytes(SHM_SIZE)
        self.set_write(state)
        _SYNC.pack_into(self._mm, _SYNC_OFF, synced_lsn, 0)
        _IDS_COUNT.pack_into(self._mm, _IDS_OFF, len(identities))
        for i, ident in enumerate(identities):
            _ID.pack_into(self._mm, _IDS_OFF + _IDS_COUNT.size + i * _ID.size, *ident)
        _HEAD.pack_into(self._mm, 0, _MAGIC, int.from_bytes(os.urandom(8), "little"))

    def invalidate(self) -> None:
        _HEAD.pack_into(self._mm, 0, b"\0" * 8, 0)

    def mark_repairing(self, pid: int) -> None:
        """``walstore repair`` (holding the log exclusively) tells openers to go away."""
        _HEAD.pack_into(self._mm, 0, _REPAIR_MAGIC, pid)

    def is_valid(self) -> bool:
        magic, _gen = _HEAD.unpack_from(self._mm, 0)
        return bool(magic == _MAGIC)

    def identities(self) -> list[tuple[int, int]]:
        (count,) = _IDS_COUNT.unpack_from(self._mm, _IDS_OFF)
        base = _IDS_OFF + _IDS_COUNT.size
        return [
            tuple(_ID.unpack_from(self._mm, base + i * _ID.size))
            for i in range(min(count, _MAX_IDS))
        ]

    # -- write region --
    def write_state(self) -> WriteState:
        """The write region; raises TornStateError if its checksum fails."""
        *fields, stored = _WRITE.unpack_from(self._mm, _WRITE_OFF)
        if crc(self._mm[_WRITE_OFF : _WRITE_OFF + _WRITE.size - 4]) != stored:
            raise TornStateError("shared write state checksum mismatch")
        return WriteState(*fields)

    def write_state_snapshot(self, tries: int = 200) -> WriteState:
        """A consistent read without the append lock (retries while a writer updates).

        Raises TornStateError if it stays torn: the writer may have been preempted in the
        middle of its update, or have died there. Callers then read under the lock."""
        for attempt in range(tries):
            try:
                return self.write_state()
            except TornStateError:
                if attempt % 16 == 15:
                    os.sched_yield()
        raise TornStateError("shared write state stayed inconsistent")

    def set_write(self, state: WriteState) -> None:
        raw = _WRITE.pack(*state, 0)[:-4]
        # One memcpy of the whole region, checksum included.
        self._mm[_WRITE_OFF : _WRITE_OFF + _WRITE.size] = raw + struct.pack("<I", crc(raw))

    # -- sync region --
    def synced_lsn(self) -> int:
        return int(_SYNC.unpack_from(self._mm, _SYNC_OFF)[0])

    def poisoned(self) -> bool:
        return bool(_SYNC.unpack_from(self._mm, _SYNC_OFF)[1])

    def set_synced(self, synced_lsn: int) -> None:
        """Publish the high water mark (flush leader only). Never touches the poisoned
        flag, which another process may set at any moment."""
        _SYNCED.pack_into(self._mm, _SYNC_OFF, synced_lsn)

    def set_poisoned(self) -> None:
        """Poison the log for every process; only ``initialise`` (recovery) clears it."""
        _POISONED.pack_into(self._mm, _SYNC_OFF + _SYNCED.size, 1)

    # -- flush sequence (written by the flush leader only; any value is safe) --
    def flush_seq(self) -> int:
        return int(_SEQ.unpack_from(self._mm, _SEQ_OFF)[0])

    def set_flush_seq(self, seq: int) -> None:
        _SEQ.pack_into(self._mm, _SEQ_OFF, seq & 0xFFFFFFFFFFFFFFFF)


class FileLock:
    """An exclusive flock(2) plus a thread lock: flock alone does not exclude threads
    that share the descriptor."""

    def __init__(self, path: str) -> None:
        self._fd = open_private(path, os.O_RDWR | os.O_CREAT)
        self._thread = threading.Lock()

    def acquire(self, blocking: bool = True) -> bool:
        if not self._thread.acquire(blocking):
            return False
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            self._thread.release()
            return False
        except BaseException:
            self._thread.release()
            raise
        return True

    def release(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._thread.release()

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def identity(self) -> tuple[int, int]:
        return file_identity(self._fd)

    def close(self) -> None:
        os.close(self._fd)


class CommitGate:
    """Leader election for group commit, across threads and processes.

    The leader holds ``lead`` (exclusive, taken without waiting) and the gate of its
    flush (exclusive) while it flushes. Everyone else waits on that gate in shared mode
    without keeping it (as PostgreSQL's LWLockAcquireOrWait): all waiters wake at once
    when the flush ends, most find their records covered, and one of the rest becomes the
    next leader. Nobody queues to take ``lead``, so there is no convoy of processes waking
    one by one only to find there is nothing left to do.

    Flushes take turns on ``len(gate_paths)`` gates (flush ``n`` uses gate ``n % len``;
    ``n`` lives in the shared state). With one gate, the next leader, woken on the other
    core, took the gate back before most of the woken waiters had run; flock(2) then put
    them back to sleep, and a record already durable waited through a second flush.
    """

    def __init__(self, lead_path: str, gate_paths: list[str], state: SharedState) -> None:
        self._lead = open_private(lead_path, os.O_RDWR | os.O_CREAT)
        self._gates = [open_private(p, os.O_RDWR | os.O_CREAT) for p in gate_paths]
        # Waiting uses its own open file description: a shared flock on the leader's
        # descriptor would convert the leader's exclusive lock instead of waiting.
        self._waits = [os.open(p, os.O_RDONLY | os.O_CLOEXEC) for p in gate_paths]
        self._state = state
        # The gate taken, remembered rather than re-read from the shared state at the end:
        # unlocking a gate not held would leave the held one locked for good.
        self._held = -1
        self._thread = threading.Lock()

    def try_lead(self) -> bool:
        if not self._thread.acquire(blocking=False):
            return False
        try:
            fcntl.flock(self._lead, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._thread.release()
            return False
        except BaseException:
            self._thread.release()
            raise
        # Only waits for followers passing through their shared lock.
        self._held = self._state.flush_seq() % len(self._gates)
        fcntl.flock(self._gates[self._held], fcntl.LOCK_EX)
        return True

    def end_lead(self) -> None:
        # Waiters that look from now on wait for the next flush, on the next gate.
        self._state.set_flush_seq(self._state.flush_seq() + 1)
        fcntl.flock(self._lead, fcntl.LOCK_UN)
        fcntl.flock(self._gates[self._held], fcntl.LOCK_UN)
        self._thread.release()

    def wait(self) -> None:
        """Sleep until the current flush (if any) ends."""
        fd = self._waits[self._state.flush_seq() % len(self._waits)]
        fcntl.flock(fd, fcntl.LOCK_SH)
        fcntl.flock(fd, fcntl.LOCK_UN)

    def identities(self) -> list[tuple[int, int]]:
        """(device, inode) of the lead lock, then of each gate."""
        return [file_identity(fd) for fd in (self._lead, *self._gates)]

    def close(self) -> None:
        for fd in (self._lead, *self._gates, *self._waits):
            os.close(fd)
