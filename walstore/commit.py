"""Appends and group commit (used by ``Wal``; the segments below are ``walstore.writer``).

Group commit across threads and processes, with one write lock (``append.lock``) and
no queue on it. Whoever takes the lock without waiting is the *leader*: it writes its
own records and those of every producer waiting in a slot of the shared state, in one
pwrite; makes them durable with one fdatasync; publishes the high water mark; and wakes
every follower at once (a futex, see walstore.futex). A producer that finds the lock
taken puts its payloads in its own slot and sleeps until they are written and durable,
or until the lock is free and it can lead the next flush itself. A flush costs one
wake-up per waiting producer; nobody herds on a lock.

Crash safety, as before the slots: the leader sets an *intent* before it writes, so a
leader killed mid-write has its bytes zeroed by the next holder of the lock (never a
half record or half batch mid-log), and the slots it took are still ready, to be
written again. A leader killed after its write state was updated (the records are in
the log) but before it marked its slots written: the write state names the last batch
written, and the next leader settles the slots of that batch as written. A producer
killed while filling its slot leaves nothing: a slot is ready only once filled, and a
leader checks its checksum.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time

from .errors import LogFullError, WalError
from .format import RECORD_HEADER_SIZE, SEGMENT_HEADER_SIZE, pack_batch, pack_record
from .fs import OsFs
from .options import Options, SyncPolicy
from .shm import (
    ERR_FULL,
    ERR_POISONED,
    INTENT_APPEND,
    INTENT_NONE,
    SLOT_CAPACITY,
    SLOT_COUNT,
    SLOT_FAILED,
    SLOT_FREE,
    SLOT_READY,
    SLOT_WRITTEN,
    SharedState,
    WriteLock,
    WriteState,
    slot_bytes,
)
from .writer import ERR_UNKNOWN, SegmentWriter

# A follower re-checks at least this often, whatever it hears: covers a leader killed
# before waking anyone, and the rare wake-up that lands between a check and the sleep.
FOLLOWER_WAIT = 0.02
# A flush that finds the write lock taken this long (others retaking it between its
# looks) waits in the lock's queue instead.
FLUSH_TURN_WAIT = 0.1
# Before collecting, a leader waits up to this long for as many slots to be ready as the
# last flush wrote: the producers it wrote for come back with their next records within
# microseconds (on a busy machine, only once they get a CPU), and a flush without them
# would be followed by another for them alone (PostgreSQL's commit_delay, adaptive).
GATHER_WAIT = 0.0002

Entry = tuple[int, list[bytes]]  # (slot, payloads); slot -1: the leader's own


class SlotPool:
    """The slots one ``Wal`` handle owns: claimed when first needed (an OFD lock on the
    slot's byte of ``shm``), kept until close, lent to one appending thread at a time."""

    def __init__(self, shm: SharedState, wlock: WriteLock) -> None:
        self._shm, self._wlock = shm, wlock
        self._free: collections.deque[int] = collections.deque()  # atomic append/pop
        self._owned: set[int] = set()
        self._lock = threading.Lock()  # claiming only
        self._retry_at = 0.0  # when every slot was taken: look again after this

    def get(self) -> int | None:
        """A slot for this thread, or None if every slot is taken (then append the slow
        way: wait for the write lock)."""
        try:
            return self._free.pop()
        except IndexError:
            pass
        with self._lock:
            if time.monotonic() < self._retry_at:
                return None
            for slot in range(SLOT_COUNT):
                if slot in self._owned or not self._shm.try_claim_slot(slot):
                    continue
                with self._wlock:  # a dead owner may have left it ready: no leader reads
                    self._shm.reset_slot(slot)  # it while we reset it
                self._owned.add(slot)
                return slot
            self._retry_at = time.monotonic() + 1.0  # owners that die free theirs
            return None

    def put(self, slot: int) -> None:
        self._free.append(slot)


class Writer(SegmentWriter):
    """Appends and flushes for one ``Wal`` handle; the state itself is shared."""

    def __init__(
        self,
        directory: str,
        options: Options,
        fs: OsFs,
        shm: SharedState,
        wlock: WriteLock,
        wal_id: bytes,
    ) -> None:
        super().__init__(directory, options, fs, shm, wlock, wal_id)
        self._pool = SlotPool(shm, wlock)

    # ----------------------------------------------------------------- appending
    def append(self, payloads: list[bytes]) -> range:
        """Append ``payloads`` as one atomic batch; returns their LSNs once durable."""
        if self._opts.sync is SyncPolicy.NONE:
            self._wlock.acquire()
            return self._lead(payloads, durable=False)
        shm = self._shm
        if not shm.leading() and self._wlock.acquire(blocking=False):
            if shm.slots_hint() == 0:
                return self._lead_alone(payloads)
            return self._lead(payloads)
        slot = self._pool.get() if slot_bytes(payloads) <= SLOT_CAPACITY else None
        if slot is None:  # too big for a slot, or none left: wait for the lock
            self._wlock.acquire()
            return self._lead(payloads)
        return self._follow(slot, payloads)

    def flush(self, end: int, force: bool, settle: bool = False) -> int:
        """Make every LSN below ``end`` durable (``force``: with SyncPolicy.NONE, by an
        fdatasync of its own, whatever the high water mark); returns the high water
        mark. With SyncPolicy.ALWAYS every flush is durable, so a high water mark at or
        past ``end`` is enough (with another handle on the log appending under NONE,
        that mark may be ahead of the disk: policies are not meant to be mixed).

        ``settle``: also write every record waiting in a slot, so that an append whose
        producer died waiting is in the log when this returns, or never will be (it is
        not counted in ``end``: the next leader would write it, at any later time)."""
        shm, word = self._shm, self._shm.flush_word
        always = self._opts.sync is SyncPolicy.ALWAYS
        missed = 0.0  # when the write lock was first found taken
        while True:
            seen = word.value
            synced = shm.synced_lsn()
            waiting = settle and shm.ready_slots() > 0
            if synced >= end and (always or not force) and not waiting:
                if force and shm.poisoned():
                    raise self.poisoned_error()
                return synced
            if shm.poisoned():
                raise self.poisoned_error()
            now = time.monotonic()
            missed = missed or now
            # Others retaking the lock between our looks for this long: queue for it.
            if self._wlock.acquire(blocking=now - missed > FLUSH_TURN_WAIT):
                self._lead(None, durable=force or always)
                return shm.synced_lsn()
            word.wait(seen, FOLLOWER_WAIT)

    def _follow(self, slot: int, payloads: list[bytes]) -> range:
        shm, word = self._shm, self._shm.flush_word
        shm.fill_slot(slot, payloads)
        quiet = False  # the last wait timed out: the leader may have died holding the lock
        try:
            while True:
                seen = word.value
                state, first, count, err = shm.slot_result(slot)
                if state == SLOT_WRITTEN and shm.synced_lsn() >= first + count:
                    shm.set_slot_state(slot, SLOT_FREE)  # no leader looks at it now
                    if count != len(payloads):  # the slot was overwritten: which LSNs?
                        raise self._slot_error(ERR_UNKNOWN)
                    return range(first, first + count)
                if state == SLOT_FAILED:
                    raise self._slot_error(err)
                if state != SLOT_READY and state != SLOT_WRITTEN:
                    # Overwritten under us (nobody else frees a slot in use): nothing will
                    # ever write it or fail it, and whether it was written is not known.
                    raise self._slot_error(ERR_UNKNOWN)
                if shm.poisoned():
                    raise self.poisoned_error()
                if (quiet or not shm.leading()) and self._wlock.acquire(blocking=False):
                    self._lead(None)
                else:
                    word.wait(seen, FOLLOWER_WAIT)
                    quiet = word.value == seen
        finally:
            self._release_slot(slot)

    def _release_slot(self, slot: int) -> None:
        state = self._shm.slot_result(slot)[0]
        if state == SLOT_READY:
            with self._wlock:  # a leader may be reading it right now
                self._shm.set_slot_state(slot, SLOT_FREE)
        elif state != SLOT_FREE:
            self._shm.set_slot_state(slot, SLOT_FREE)
        self._pool.put(slot)

    def _slot_error(self, err: int) -> WalError:
        if err == ERR_FULL:
            return LogFullError(
                f"the log in {self._dir} is full (WAL_MAX_BYTES, or the disk): nothing was "
                "appended; let the pump confirm the backlog, raise WAL_MAX_BYTES or free "
                "disk space, then append again"
            )
        if err == ERR_POISONED:
            return self.poisoned_error()
        return WalError(
            f"the outcome of an append to {self._dir} is unknown: the shared state was "
            "damaged while it was being written; check the log with 'walstore dump'"
        )

    # ----------------------------------------------------------------- leading
    def _lead(self, own: list[bytes] | None, durable: bool = True) -> range:
        """Write ``own`` and every ready slot, fdatasync (if ``durable``), publish the
        high water mark. Called with the write lock held; releases it."""
        shm = self._shm
        try:
            st = self.writable_state()
            entries: list[Entry] = [(-1, own)] if own else []
            if durable and shm.slots_hint():
                self._gather()
                entries += self._collect(st)
                shm.set_last_gather(len(entries))
            st, mine = self._write(st, entries)
            if durable:
                try:
                    self._fs.fdatasync(self.fd(st.active))
                except OSError as exc:
                    raise self.io_error("fsync", exc) from exc
                if shm.poisoned():
                    # Another process failed a write or an fsync meanwhile: the kernel may
                    # have dropped pages of this file, so this fsync proves nothing.
                    raise self.poisoned_error()
            shm.set_synced(max(shm.synced_lsn(), st.next_lsn))
            return mine
        finally:
            self._wlock.release()

    def _lead_alone(self, own: list[bytes]) -> range:
        """``_lead`` when nobody ever waited in a slot (one producer): the same steps,
        inlined. On a producer that sleeps through every fdatasync, each line of Python
        runs on cold caches: this path measured ~2x fewer CPU microseconds per append
        than the general one (see bench/wal.py). Called with the write lock held."""
        shm, fs = self._shm, self._fs
        try:
            st = self.writable_state()
            n = len(own)
            end = st.offset + sum(map(len, own)) + RECORD_HEADER_SIZE * n
            cap = self._opts.max_bytes
            if end > self._opts.segment_bytes or (cap is not None and st.sealed_bytes + end > cap):
                st, mine = self._write(st, [(-1, own)])  # roll-over or cap: the long way
            else:
                first, salt = st.next_lsn, st.salt
                if n == 1:
                    buf = pack_record(salt, first, own[0])
                else:
                    buf = b"".join(pack_batch(salt, first, own))
                active, offset, sealed, batch = st.active, st.offset, st.sealed_bytes, st.last_batch
                shm.set_write(WriteState(active, salt, INTENT_APPEND, offset, first, sealed,
                                         end, batch))  # fmt: skip
                try:
                    fs.pwrite(self._fds.get(active) or self.fd(active), buf, offset)
                except OSError as exc:
                    with contextlib.suppress(WalError, OSError):
                        self.writable_state()  # zero what landed (see _write_chunk)
                    raise self.io_error("write", exc) from exc
                st = WriteState(active, salt, INTENT_NONE, end, first + n, sealed, 0, batch)
                shm.set_write(st)
                mine = range(first, first + n)
            try:
                fs.fdatasync(self._fds.get(st.active) or self.fd(st.active))
            except OSError as exc:
                raise self.io_error("fsync", exc) from exc
            if shm.poisoned():
                raise self.poisoned_error()
            if st.next_lsn > shm.synced_lsn():
                shm.set_synced(st.next_lsn)
            return mine
        finally:
            self._wlock.release()

    def _gather(self) -> None:
        shm = self._shm
        want = shm.last_gather() - 1  # the last leader's own producer may lead again
        if want < 2:
            return
        # Sleep rather than spin: spinning burnt the CPU the producers needed to fill
        # their slots (and counted in every append's CPU time).
        for _ in range(2):
            if shm.ready_slots() >= want:
                return
            time.sleep(GATHER_WAIT / 2)

    def _collect(self, st: WriteState) -> list[Entry]:
        shm, out = self._shm, []
        for slot in range(shm.slots_hint()):
            batch, payloads = shm.ready_slot(slot)
            if payloads is None:
                continue
            if batch and batch == st.last_batch:  # its leader died before saying so
                shm.set_slot_state(slot, SLOT_WRITTEN)
            else:
                out.append((slot, payloads))
        return out

    def _write(self, st: WriteState, entries: list[Entry]) -> tuple[WriteState, range]:
        """Write the entries in order, rolling over to new segments as needed; an entry
        that does not fit under the cap is refused (its slot failed, or LogFullError if
        it is the leader's own). Returns the new state and the leader's own LSNs."""
        if len(entries) == 1 and entries[0][0] < 0:  # the usual case alone: no slots
            own = entries[0][1]
            need = sum(map(len, own)) + RECORD_HEADER_SIZE * len(own)
            cap = self._opts.max_bytes
            if st.offset + need <= self._opts.segment_bytes and (
                cap is None or st.sealed_bytes + st.offset + need <= cap
            ):
                first, salt = st.next_lsn, st.salt
                records = pack_batch(salt, first, own)
                return self._write_chunk(st, records, []), range(first, first + len(own))
        mine = range(0)
        chunk: list[bytes] = []  # packed records for the active segment
        placed: list[tuple[int, int]] = []  # (slot, first LSN) of the entries in chunk
        size = 0
        for slot, payloads in entries:
            need = sum(len(p) for p in payloads) + RECORD_HEADER_SIZE * len(payloads)
            roll = st.offset + size + need > self._opts.segment_bytes
            roll = roll and st.offset + size > SEGMENT_HEADER_SIZE
            try:
                st = self._check_cap(st, size + need + (SEGMENT_HEADER_SIZE if roll else 0))
                if roll:
                    pending, chunk, placed, size = (chunk, placed), [], [], 0
                    st = self._write_chunk(st, *pending)
                    st = self._roll(st)
            except LogFullError:
                if slot < 0 or (mine and mine.start >= st.next_lsn):  # own records unwritten
                    raise
                self._shm.set_slot_state(slot, SLOT_FAILED, ERR_FULL)
                continue
            first = st.next_lsn + len(chunk)
            chunk += pack_batch(st.salt, first, payloads)
            size += need
            if slot < 0:
                mine = range(first, first + len(payloads))
            else:
                placed.append((slot, first))
        try:
            return self._write_chunk(st, chunk, placed), mine
        except LogFullError:  # the disk filled up: the slots of this chunk failed
            if mine and mine.start >= st.next_lsn:
                raise  # the own records were in it
            return st, mine

    def _write_chunk(
        self, st: WriteState, chunk: list[bytes], placed: list[tuple[int, int]]
    ) -> WriteState:
        if not chunk:
            return st
        shm = self._shm
        batch = st.last_batch
        if placed:
            batch = shm.take_batch_id()
            for slot, first in placed:
                shm.assign_slot(slot, batch, first)
        buf = b"".join(chunk)
        shm.set_write(st._replace(intent=INTENT_APPEND, pending_end=st.offset + len(buf)))
        try:
            self._fs.pwrite(self.fd(st.active), buf, st.offset)
        except OSError as exc:
            # Zero whatever part of the batch landed before raising, so that no record of
            # it can surface at the next recovery. If that fails too, the intent stays set
            # and the next holder retries.
            with contextlib.suppress(WalError, OSError):
                self.writable_state()
            error = self.io_error("write", exc)
            code = ERR_FULL if isinstance(error, LogFullError) else ERR_POISONED
            for slot, _first in placed:
                shm.set_slot_state(slot, SLOT_FAILED, code)
            raise error from exc
        st = WriteState(st.active, st.salt, INTENT_NONE, st.offset + len(buf),
                        st.next_lsn + len(chunk), st.sealed_bytes, 0, batch)  # fmt: skip
        shm.set_write(st)
        for slot, _first in placed:
            shm.set_slot_state(slot, SLOT_WRITTEN)
        return st
