"""State shared by every process that has one log open, and the lock that guards it.

The state lives in an mmap'd file (``shm`` in the log's directory), like SQLite's
``-shm``: it is a cache of what the segments say, never trusted after a crash. The first
process to open the log (the one that gets the attach lock exclusively) rebuilds it from
disk; later ones attach to it (see walstore.attach).

- The write region (written only under the write lock, ``append.lock``): active
  segment, its salt, the append offset, the next LSN, bytes in sealed segments, the last
  batch written (see the slots), and an *intent* that says an append or a roll-over was
  started; a process killed inside the write lock leaves the intent set and the next
  holder cleans up after it (so a half record never ends up in the middle of the log).
  Two copies and a one-byte selector: an update writes the unused copy, then flips the
  selector, so a writer killed mid-update never leaves the selected copy torn. Each copy
  carries a generation: a selector that names the older of two sound copies (damaged)
  is refused like a torn copy, and the state is read back from disk.
- The sync region: the high water mark (every LSN below it is durable), and the
  poisoned flag (an fsync failed; nothing more is acknowledged until recovery).
- The flush word: bumped at the end of every flush; followers sleep on it (a futex).
- The slots (group commit, see walstore.commit): a producer that finds a flush under way
  puts its payloads in its own slot and sleeps; the next leader writes every ready slot
  with its own records, in one pwrite and one fdatasync, and marks them written. A slot
  belongs to one producer thread at a time, by an OFD lock on its byte of ``shm``.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct
import threading
from types import TracebackType
from typing import NamedTuple

from .format import crc
from .fs import open_private
from .futex import Word

# Version 4: the write region's generations (3: the slots and the double write region).
# A process of an older release finds the magic unknown and does not attach.
_MAGIC = b"WALSHM\x00\x04"
_REPAIR_MAGIC = b"WALRPR\x00\x03"  # walstore repair runs; the generation field is its pid
_HEAD = struct.Struct("<8sQ")  # magic, generation
_WRITE = struct.Struct("<QIIQQQQQII")  # WriteState, generation, then the CRC of the rest
_WRITE_BODY = struct.Struct("<QIIQQQQQI")  # the same without the CRC
_GEN = struct.Struct("<I")
_GEN_OFF = _WRITE_BODY.size - _GEN.size  # a copy's generation, within it (checksummed)
_SELECTOR_OFF = 64  # which copy of the write region is current: 0 or 1
_WRITE_OFFS = (72, 136)
_REGION_END = _WRITE_OFFS[1] + _WRITE.size  # the selector and both copies end here
_SYNC_OFF_POISONED = 8  # the sync region: u64 synced_lsn (high water mark), u32 poisoned
_SYNC_OFF = 200
_FLUSH_WORD_OFF = 224  # u32, the futex followers sleep on
_U64, _U32 = struct.Struct("<Q"), struct.Struct("<I")
_NEXT_BATCH_OFF = 232  # u64: the next batch id (write lock)
_SLOTS_HINT_OFF = 240  # u32: slots in use are below this index
_LAST_GATHER_OFF = 244  # u32: how many slots the last flush wrote (a hint for the next)
_LEADING_OFF = 248  # u8: 1 while the write lock is held (a hint: stale if its holder died)

_IDS_OFF = 320  # the identities of the shared files: count, then (st_dev, st_ino) each
_IDS_COUNT = struct.Struct("<I")
_ID = struct.Struct("<QQ")
_MAX_IDS = 32

SLOT_COUNT = 64
SLOT_SIZE = 16384
_SLOTS_OFF = 4096
# state, count, nbytes, data crc, error, -, batch, first LSN
_SLOT = struct.Struct("<IIIII4xQQ")
_SLOT_DATA = 48
SLOT_CAPACITY = SLOT_SIZE - _SLOT_DATA  # payload bytes + 4 per payload
_LEN = struct.Struct("<I")
_SLOT_LOCK_BASE = 1 << 32  # OFD lock byte of slot i: _SLOT_LOCK_BASE + i (past the data)
_LWM_LOCK_BYTE = _SLOT_LOCK_BASE - 1  # OFD lock byte: moving the low water mark
_FLOCK = struct.Struct("hhqqi4x")  # struct flock (Linux, 64-bit off_t)

SHM_SIZE = _SLOTS_OFF + SLOT_COUNT * SLOT_SIZE

SLOT_FREE, SLOT_READY, SLOT_WRITTEN, SLOT_FAILED = 0, 1, 2, 3
ERR_FULL, ERR_POISONED = 1, 2

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
    last_batch: int = 0  # id of the last batch of slots whose records are in the log


class TornStateError(Exception):
    """The write region failed its checksum: read while a writer was updating it."""


class _OlderSelected(TornStateError):
    """The selector names the older of two sound copies: damage, or a writer that died
    (or is) between writing the other copy and selecting it."""

    def __init__(self, selected: WriteState) -> None:
        super().__init__("shared write state selector names the older copy")
        self.selected = selected


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


def _newer(a: int, b: int) -> bool:
    """Generation ``a`` is after ``b`` (32-bit serial numbers: they wrap)."""
    return 0 < (a - b) & 0xFFFFFFFF < 0x80000000


def _decode_region(region: bytes) -> WriteState:
    """The state the selector and the two copies of the write region (read from the
    selector on, in one piece) say; TornStateError if the selected copy does not verify,
    or if the selector names the older of two sound copies (damaged, or read between a
    writer's two steps): never act on a state one update old."""
    selected = region[0] & 1
    off = _WRITE_OFFS[selected] - _SELECTOR_OFF
    *fields, gen, stored = _WRITE.unpack_from(region, off)
    if crc(region[off : off + _WRITE_BODY.size]) != stored:
        raise TornStateError("shared write state checksum mismatch")
    other = _WRITE_OFFS[selected ^ 1] - _SELECTOR_OFF
    *_, other_gen, other_stored = _WRITE.unpack_from(region, other)
    if _newer(other_gen, gen) and crc(region[other : other + _WRITE_BODY.size]) == other_stored:
        raise _OlderSelected(WriteState(*fields))
    return WriteState(*fields)


def _slot_off(slot: int) -> int:
    return _SLOTS_OFF + slot * SLOT_SIZE


def slot_bytes(payloads: list[bytes]) -> int:
    """Room ``payloads`` take in a slot (compare with SLOT_CAPACITY)."""
    return sum(len(p) for p in payloads) + _LEN.size * len(payloads)


class SharedState:
    def __init__(self, path: str) -> None:
        self._fd = open_private(path, os.O_RDWR | os.O_CREAT)
        try:
            if os.fstat(self._fd).st_size < SHM_SIZE:
                os.ftruncate(self._fd, SHM_SIZE)
            self._mm = mmap.mmap(self._fd, SHM_SIZE)
            # The OFD locks (slot claims, the low water mark) go on an open file of their
            # own: CPython's mmap keeps a duplicate of the mapping's descriptor, which a
            # forked child cannot close, and a lock on that open file would outlive a
            # parent killed holding it for as long as the child lives.
            self._lock_fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except BaseException:
            os.close(self._fd)
            raise
        self._view = memoryview(self._mm)
        self.flush_word = Word(self._mm, _FLUSH_WORD_OFF)
        # The fields other processes read without a lock, each stored and loaded in one
        # machine word: struct.pack_into zeroes its bytes before it writes them, and a
        # reader saw the high water mark go back to 0 for that moment.
        self._synced = ctypes.c_uint64.from_buffer(self._mm, _SYNC_OFF)
        self._poisoned = ctypes.c_uint32.from_buffer(self._mm, _SYNC_OFF + _SYNC_OFF_POISONED)
        self._hint = ctypes.c_uint32.from_buffer(self._mm, _SLOTS_HINT_OFF)
        self._states = [ctypes.c_uint32.from_buffer(self._mm, _slot_off(slot))
                        for slot in range(SLOT_COUNT)]  # fmt: skip
        # The last write region this process verified or wrote, as (bytes, state): the
        # same bytes again need no unpacking or checksum (one tuple: threads read it).
        self._known: tuple[bytes, WriteState] = (b"", WriteState(0, 0, 0, 0, 0, 0, 0))

    def close(self) -> None:
        self.flush_word.close()
        del self._synced, self._poisoned, self._hint, self._states  # they pin the mapping
        self._view.release()
        self._mm.close()
        os.close(self._lock_fd)
        os.close(self._fd)

    def fds(self) -> tuple[int, ...]:
        """Its descriptors (to close in a forked child, see walstore.attach)."""
        return self._fd, self._lock_fd

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
        self._mm[:_SLOTS_OFF] = bytes(_SLOTS_OFF)
        # Every slot free: a payload left waiting by a producer that died was not in the
        # log this recovery found, and must never be written later. Resetting a slot when
        # it is claimed is not enough: a claim and its reset are two steps, and another
        # producer's claim may raise the hint past a claimed slot not yet reset.
        for slot_state in self._states:
            slot_state.value = SLOT_FREE
        self.set_write(state)
        self._synced.value = synced_lsn
        self._poisoned.value = 0
        _U64.pack_into(self._mm, _NEXT_BATCH_OFF, 1)
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
    def write_state(self, dead_writer: bool = False) -> WriteState:
        """The current write region; raises TornStateError if it is being rewritten
        (only possible without the write lock), or damaged.

        ``dead_writer`` (write lock held, and its last holder died holding it): a
        selector that names the older of two sound copies is that writer's death
        between writing the other copy and selecting it, not damage: the selected copy
        stands (written again, so that the next holder finds it sound)."""
        region = self._mm[_SELECTOR_OFF:_REGION_END]
        known = self._known
        if region == known[0]:  # the same bytes: the same answer
            return known[1]
        try:
            state = _decode_region(region)
        except _OlderSelected as exc:
            if not dead_writer:
                raise
            self.set_write(exc.selected)
            return exc.selected
        self._known = (region, state)
        return state

    def write_state_snapshot(self, tries: int = 200) -> WriteState:
        """A consistent read without the write lock (retries while a writer updates).

        Raises TornStateError if it stays torn: the writer may have been preempted in the
        middle of two updates. Callers then read under the lock."""
        for attempt in range(tries):
            try:
                return self.write_state()
            except TornStateError:
                if attempt % 16 == 15:
                    os.sched_yield()
        raise TornStateError("shared write state stayed inconsistent")

    def set_write(self, state: WriteState) -> None:
        """Write the unused copy, then select it (write lock held)."""
        mm = self._mm
        spare = (mm[_SELECTOR_OFF] & 1) ^ 1
        off = _WRITE_OFFS[spare]
        gen = _GEN.unpack_from(mm, _WRITE_OFFS[spare ^ 1] + _GEN_OFF)[0]
        older = _GEN.unpack_from(mm, off + _GEN_OFF)[0]
        if _newer(older, gen):  # the selected copy was damaged: stay ahead of both
            gen = older
        body = _WRITE_BODY.pack(*state, (gen + 1) & 0xFFFFFFFF)
        raw = body + _U32.pack(crc(body))
        mm[off : off + _WRITE.size] = raw
        mm[_SELECTOR_OFF] = spare  # one byte: the switch is atomic
        self._known = (mm[_SELECTOR_OFF:_REGION_END], state)  # nobody else writes it now

    def take_batch_id(self) -> int:
        """A batch id never used before in this state (write lock held)."""
        (batch,) = _U64.unpack_from(self._mm, _NEXT_BATCH_OFF)
        _U64.pack_into(self._mm, _NEXT_BATCH_OFF, batch + 1)
        return int(batch)

    # -- sync region --
    def synced_lsn(self) -> int:
        return int(self._synced.value)

    def poisoned(self) -> bool:
        return bool(self._poisoned.value)

    def set_synced(self, synced_lsn: int) -> None:
        """Publish the high water mark (write lock held). Never touches the poisoned
        flag, which another process may set at any moment."""
        self._synced.value = synced_lsn

    def set_poisoned(self) -> None:
        """Poison the log for every process; only ``initialise`` (recovery) clears it."""
        self._poisoned.value = 1

    # -- slots --
    def slots_hint(self) -> int:
        return int(self._hint.value)

    def ready_slots(self) -> int:
        """How many slots are ready (a hint: read without any lock)."""
        mm, end = self._mm, _slot_off(self.slots_hint())
        return sum(1 for off in range(_SLOTS_OFF, end, SLOT_SIZE) if mm[off] == SLOT_READY)

    def leading(self) -> bool:
        return bool(self._mm[_LEADING_OFF])

    def set_leading(self, on: bool) -> None:
        self._mm[_LEADING_OFF] = int(on)

    def last_gather(self) -> int:
        return int(_U32.unpack_from(self._mm, _LAST_GATHER_OFF)[0])

    def set_last_gather(self, count: int) -> None:
        _U32.pack_into(self._mm, _LAST_GATHER_OFF, count)

    def try_claim_slot(self, slot: int) -> bool:
        """Own ``slot`` (for this open file) while it stays open; False if taken."""
        lock = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, _SLOT_LOCK_BASE + slot, 1, 0)
        try:
            fcntl.fcntl(self._lock_fd, fcntl.F_OFD_SETLK, lock)
        except (BlockingIOError, PermissionError):
            return False
        return True

    def lock_low_water_mark(self) -> None:
        """Wait for, then take, the right to move the low water mark (one process at a
        time; released by ``unlock_low_water_mark`` or the process's death)."""
        lock = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, _LWM_LOCK_BYTE, 1, 0)
        fcntl.fcntl(self._lock_fd, fcntl.F_OFD_SETLKW, lock)

    def unlock_low_water_mark(self) -> None:
        lock = _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, _LWM_LOCK_BYTE, 1, 0)
        fcntl.fcntl(self._lock_fd, fcntl.F_OFD_SETLK, lock)

    def reset_slot(self, slot: int) -> None:
        """Make a newly claimed slot free (write lock held: a leader may be reading a
        slot left ready by a process that died)."""
        _SLOT.pack_into(self._mm, _slot_off(slot), SLOT_FREE, 0, 0, 0, 0, 0, 0)
        if self.slots_hint() <= slot:
            self._hint.value = slot + 1

    def fill_slot(self, slot: int, payloads: list[bytes]) -> None:
        """The owner puts its payloads in, then marks the slot ready (last)."""
        off = _SLOTS_OFF + slot * SLOT_SIZE
        if len(payloads) == 1:
            data = _LEN.pack(len(payloads[0])) + payloads[0]
        else:
            data = b"".join([_LEN.pack(len(p)) + p for p in payloads])
        head = _SLOT.pack(SLOT_FREE, len(payloads), len(data), crc(data), 0, 0, 0)
        mm = self._mm
        mm[off : off + _SLOT_DATA + len(data)] = head + bytes(_SLOT_DATA - _SLOT.size) + data
        self._states[slot].value = SLOT_READY  # last: the data and header are in place

    def slot_result(self, slot: int) -> tuple[int, int, int, int]:
        """(state, first LSN, count, error) of a slot."""
        state, count, _n, _crc, err, _batch, first = _SLOT.unpack_from(self._mm, _slot_off(slot))
        return state, first, count, err

    def ready_slot(self, slot: int) -> tuple[int, list[bytes] | None]:
        """For a leader: (batch, payloads) of a ready slot; payloads None if the slot is
        not ready, or its data is not all there yet (checksum)."""
        off = _SLOTS_OFF + slot * SLOT_SIZE
        mm = self._mm
        state, count, nbytes, stored, _err, batch, _first = _SLOT.unpack_from(mm, off)
        if state != SLOT_READY or nbytes > SLOT_CAPACITY:
            return batch, None
        start = off + _SLOT_DATA
        if crc(self._view[start : start + nbytes]) != stored:
            return batch, None
        payloads, pos, end = [], start, start + nbytes
        for _ in range(count):
            (length,) = _LEN.unpack_from(mm, pos)
            payloads.append(mm[pos + 4 : min(pos + 4 + length, end)])
            pos += 4 + length
        return batch, payloads

    def assign_slot(self, slot: int, batch: int, first: int) -> None:
        """A leader is about to write the slot's records from LSN ``first`` in ``batch``
        (written once the write region's last_batch is ``batch``)."""
        off = _slot_off(slot)
        _U64.pack_into(self._mm, off + 24, batch)
        _U64.pack_into(self._mm, off + 32, first)

    def set_slot_state(self, slot: int, state: int, err: int = 0) -> None:
        _U32.pack_into(self._mm, _slot_off(slot) + 16, err)  # read only once the state says so
        self._states[slot].value = state


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

    def fds(self) -> tuple[int, ...]:
        """Its descriptor (to close in a forked child, see walstore.attach)."""
        return (self._fd,)

    def close(self) -> None:
        os.close(self._fd)


class WriteLock(FileLock):
    """The log's write lock (``append.lock``). Every release bumps the flush word and
    wakes the followers: whoever waits for a flush may find its records written, or the
    lock free to lead one."""

    def __init__(self, path: str, state: SharedState) -> None:
        super().__init__(path)
        self._state = state
        self.inherited = False  # from a holder that died holding it (see acquire)

    def acquire(self, blocking: bool = True) -> bool:
        if not super().acquire(blocking):
            return False
        # Still set: the last holder died holding the lock (a release clears it first).
        self.inherited = self._state.leading()
        self._state.set_leading(True)
        return True

    def release(self) -> None:
        state = self._state
        state.set_leading(False)
        state.flush_word.bump()  # before the unlock: a follower that saw the lock taken
        super().release()  # sleeps on the old value, so it cannot miss this
        if state.slots_hint():
            state.flush_word.wake_all()
