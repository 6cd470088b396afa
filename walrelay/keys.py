"""The idempotency index of ``relay.send(..., key=K)``: ``keys.sqlite3`` in WAL_DIR.

A row maps K to the digest of the tasks first sent with it, their LSN, task ids and
send time; a second send of K within the window returns that receipt (same digest) or
raises DuplicateKeyError (another digest). Sends without a key never come here.

Concurrency: a keyed send holds its key's *stripe* (one of ``STRIPES``: a thread lock
plus a byte-range lock on ``keys.lock``) across look-up, append and insert, so
two senders of one key (threads or processes) take turns and append once, while sends
of different keys rarely share a stripe and still meet in the log's group commit.
SQLite writes are serialised by one more byte-range lock, so SQLite itself never sees
a busy database (its busy handler sleeps in milliseconds). The byte-range locks are
open file description locks (Linux): a POSIX record lock belongs to the whole process,
so the kernel's deadlock check took two threads of one process waiting on different
locks for a cycle and failed the send with EDEADLK; with the thread locks ordering a
process's own threads, there is none. Elsewhere they are POSIX record locks.

Crashes. The WAL record holds its key and is the truth; the index is a cache of it:

- A sender killed between its append and its insert: before appending it writes into
  its stripe's slot in ``keys.lock`` the LSN it starts at and the hash of K, and clears
  it after the insert. Whoever next holds that stripe (or opens the index) finds the
  slot set, makes the log durable, scans from that LSN for records of K and indexes
  them. No window is left open.
- Power loss: rows are inserted only after their record is durable, so the index
  never claims a key whose record was lost. SQLite runs with synchronous=NORMAL (no
  fsync per send), so the last rows may be lost: the first process to open the index
  after a reboot (a new Linux ``boot_id``) indexes every keyed record still in the log.
  Residual window: a key whose row was lost *and* whose record the pump had already
  pruned (its whole segment confirmed) in the seconds before the power cut can be sent
  again. Elsewhere than Linux there is no boot id and no such rebuild.
- A lost end of the log (``walstore repair`` accepted it, ``LOSSES``): rows naming LSNs
  from there on are dropped, and so are the rows of records the pump had carried forward
  there, unless a copy (the original or an earlier one) is still at or above the low
  water mark, which the next pump replays (``carried``: the pump notes each move; the
  row keeps the first LSN, which names the tasks), so those keys are sent anew.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sqlite3
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from typing import Any

from walstore import LogFullError, RecordTooLargeError, Wal, WalError
from walstore.forks import ForgetInChild

from .errors import BadRecordError, DuplicateKeyError, KeyIndexError, NotSerializableError
from .receipt import Receipt
from .record import Entry, decode, task_id
from .signatures import arguments_json

DB_NAME = "keys.sqlite3"
LOCK_NAME = "keys.lock"
STRIPES = 1024
_SLOT = struct.Struct("<Q32sQ")  # scan-from LSN + 1 (0: clear), sha256(key), pid
_WRITER = STRIPES * _SLOT.size  # the byte locked around SQLite writes
PURGE_INTERVAL = 60.0  # seconds between two purges of expired keys by one process
REOPENS = 5  # a send re-opens the index at most this often before giving up
BUSY_TIMEOUT_S = 30.0
_BOOT_ID = "/proc/sys/kernel/random/boot_id"
_OFD = hasattr(fcntl, "F_OFD_SETLKW")
_FLOCK = struct.Struct("hhqqi4x")  # struct flock (Linux, 64-bit off_t)
_NOTHING_APPENDED = (LogFullError, RecordTooLargeError)

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS keys (key TEXT PRIMARY KEY, digest TEXT NOT NULL,"
    " lsn INTEGER NOT NULL, task_ids TEXT NOT NULL, created REAL NOT NULL) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS keys_created ON keys (created)",
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    # Where the pump carried a keyed record forward (its row keeps the first LSN, which
    # names its tasks): a lost tail that took the carried copy took the record.
    "CREATE TABLE IF NOT EXISTS carried (key TEXT PRIMARY KEY, origin INTEGER NOT NULL,"
    " at INTEGER NOT NULL) WITHOUT ROWID",
)


# json.dumps(x, separators=...) builds an encoder per call: these are built once (the same
# text; ~5 us less per call, and a keyed send encodes five times).
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"))
_COMPACT = json.JSONEncoder(separators=(",", ":"))

_UPSERT_NEWER = (
    "INSERT INTO keys VALUES (?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET"
    " digest = excluded.digest, lsn = excluded.lsn, task_ids = excluded.task_ids,"
    " created = excluded.created WHERE excluded.created > keys.created"
)
_NOTE_CARRIED = "INSERT OR REPLACE INTO carried VALUES (?, ?, ?)"


def digest(entry: Entry, arguments: str | None = None) -> str:
    """What "the same tasks" means: names, routes, arguments, priority, headers and the
    order key. Not eta or expires: a retried send's countdown counts from its own time.
    ``arguments``: ``arguments_json(entry.tasks)`` if the caller has it already."""
    if arguments is None:
        arguments = arguments_json(entry.tasks)
    routes = [
        [t.name, t.queue, t.options.get("exchange"), t.options.get("routing_key"),
         t.options.get("priority")]
        for t in entry.tasks
    ]  # fmt: skip
    # Mappings compare as mappings: kwargs (or a dict argument) built in another order
    # on a retry are the same call. Parsed first, so every key is a string.
    canonical = _CANONICAL.encode(json.loads(arguments))
    doc = _COMPACT.encode([entry.order_key, routes]) + canonical
    return hashlib.sha256(doc.encode()).hexdigest()


def receipt_of(wal_id: str, lsn: int, entry: Entry) -> Receipt:
    ident = entry.identity(lsn)
    return Receipt(ident, entry.key, tuple(task_id(wal_id, ident, t.target) for t in entry.tasks))


def boot_id() -> str:
    try:
        with open(_BOOT_ID) as f:
            return f.read().strip()
    except OSError:
        return ""


class KeyIndex:
    """This process's handle on the index of one WAL directory (see ``index_for``)."""

    def __init__(self, directory: str, wal: Wal) -> None:
        self.directory = directory
        self.closed = False
        # Reentrant: a re-open (``_reopen``) holds all of them while recovery takes each.
        self._threads = [threading.RLock() for _ in range(STRIPES)]
        self._db_lock = threading.Lock()
        self._next_purge = 0.0
        self._lock_path = os.path.join(directory, LOCK_NAME)
        self._db_path = os.path.join(directory, DB_NAME)
        self._fd = -1
        self._files: tuple[tuple[int, int], tuple[int, int]] | None = None
        _indexes.add(self)  # from now on, a fork lets go of it (even mid-recovery)
        try:
            with self._index_errors(os_errors=True):
                self._open(wal)
        except BaseException:
            self.close()
            raise

    def _open(self, wal: Wal) -> None:
        self._fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(os.open(self._db_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        self._db = sqlite3.connect(
            self._db_path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        # Which files these are: one removed or replaced under a live sender is noticed
        # at its next keyed send (``_moved``), not written past.
        self._files = (_identity(os.fstat(self._fd)), _identity(os.stat(self._db_path)))
        with self._db_lock, self._writer():
            self._db.execute("PRAGMA journal_mode=WAL")  # not within a transaction
        with self._writing():
            for statement in _SCHEMA:
                self._db.execute(statement)
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._recover(wal)

    def _moved(self) -> bool:
        """Whether ``keys.lock`` or ``keys.sqlite3`` is no longer the file this handle has
        open (removed or replaced): a sender writing on would not be seen by the processes
        that use the new one, nor take turns with them."""
        try:
            now = (_identity(os.stat(self._lock_path)), _identity(os.stat(self._db_path)))
        except OSError:  # gone, or not reachable: a re-open says which
            return True
        return now != self._files

    def _reopen(self, wal: Wal) -> None:
        """Open the files now at the index's paths (recovering, as any first open does),
        with every stripe of this process held, so that no thread is mid-send."""
        for lock in self._threads:
            lock.acquire()
        try:
            if self.closed or (self._fd >= 0 and not self._moved()):
                return
            with self._db_lock:
                self._db.close()  # a no-op if an earlier re-open closed it
                fd, self._fd = self._fd, -1
                if fd >= 0:
                    os.close(fd)
            self._open(wal)
        finally:
            for lock in reversed(self._threads):
                lock.release()

    @contextlib.contextmanager
    def _index_errors(self, os_errors: bool = False) -> Iterator[None]:
        """SQLite's errors (and with ``os_errors``, those of the index's own files) as
        walrelay's: ``KeyIndexError``, saying how to repair."""
        try:
            yield
        except sqlite3.Error as exc:
            raise self.unusable(str(exc)) from exc
        except OSError as exc:
            if not os_errors:
                raise
            raise self.unusable(str(exc)) from exc

    def unusable(self, why: str) -> KeyIndexError:
        return KeyIndexError(
            f"the idempotency index {self._db_path} cannot be used ({why}). A send that failed "
            "so may or may not have been appended: send it again with the same key once the "
            "index works (it appends at most once). If this lasts, the index is damaged: stop "
            f"every process that sends to {self.directory} and remove {DB_NAME} (and "
            f"{DB_NAME}-wal, {DB_NAME}-shm); the next keyed send rebuilds it from the log "
            "(keys whose records the pump already pruned can then be sent again)"
        )

    # ---------------------------------------------------------------- the send path
    def send_once(
        self, wal: Wal, entry: Entry, payload: bytes, wanted: str, window: float, now: float
    ) -> Receipt:
        """Append ``payload`` (the record of ``entry``, keyed, of digest ``wanted``) unless
        its key is live."""
        key = entry.key
        assert key is not None
        stripe = zlib.crc32(key.encode()) % STRIPES
        try:  # not _index_errors: no generator on the send path
            for _ in range(REOPENS):
                with self._threads[stripe]:
                    if self._hold(stripe):
                        try:
                            receipt = self._send_holding(
                                stripe, wal, entry, payload, wanted, window, now
                            )
                        finally:
                            _unlock(self._fd, stripe * _SLOT.size, 1)
                        break
                with self._index_errors(os_errors=True):
                    self._reopen(wal)
            else:
                raise self.unusable("its files keep being removed or replaced")
            if now >= self._next_purge:
                self._purge(now - window)
                self._next_purge = now + PURGE_INTERVAL
        except sqlite3.Error as exc:
            raise self.unusable(str(exc)) from exc
        return receipt

    def _hold(self, stripe: int) -> bool:
        """Take the stripe's byte lock on ``keys.lock``: True if it is held on the files
        at the index's paths, False (not held) if they moved and need a re-open. Checked
        with the lock held: a sender that waited for it on a keys.lock removed meanwhile
        must not go on with that file."""
        if self._fd < 0:  # an earlier re-open failed half-way
            return False
        try:
            _lock(self._fd, stripe * _SLOT.size, 1)
            if not self._moved():
                return True
            _unlock(self._fd, stripe * _SLOT.size, 1)
        except OSError as exc:
            raise self.unusable(str(exc)) from exc
        return False

    def _send_holding(
        self,
        stripe: int,
        wal: Wal,
        entry: Entry,
        payload: bytes,
        wanted: str,
        window: float,
        now: float,
    ) -> Receipt:
        """``send_once`` with the key's stripe held."""
        key = entry.key
        assert key is not None
        self._resolve(stripe, wal, window)
        found = self._lookup(key, now - window)
        if found is not None and not _in_log(wal, key, found[1].lsn):
            found = None  # its record is gone from the log (a lost tail): send again
        if found is not None:
            first_digest, receipt = found
            if first_digest != wanted:
                raise DuplicateKeyError(
                    f"key {key!r} was sent at LSN {receipt.lsn} with other tasks within "
                    f"the idempotency window ({window:g} s); use a new key for new work"
                )
            return receipt
        # At or below the LSN the record gets (a cheaper read than next_lsn).
        self._mark(stripe, key, wal.high_water_mark())
        try:
            lsn = wal.append(payload)
        except _NOTHING_APPENDED:
            self._clear(stripe)
            raise
        receipt = receipt_of(wal.wal_id, lsn, entry)
        self._insert(key, wanted, receipt, now)
        self._clear(stripe)
        return receipt

    def _lookup(self, key: str, oldest: float) -> tuple[str, Receipt] | None:
        with self._db_lock:
            row = self._db.execute(
                "SELECT digest, lsn, task_ids, created FROM keys WHERE key = ?", (key,)
            ).fetchone()
        if row is None or row[3] <= oldest:
            return None
        try:
            ids = json.loads(row[2])
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise ValueError("not a list of task ids")
            return str(row[0]), Receipt(int(row[1]), key, tuple(ids))
        except (ValueError, TypeError) as exc:
            raise self.unusable(f"the row of key {key!r} is damaged: {exc}") from None

    def _insert(self, key: str, wanted: str, receipt: Receipt, created: float) -> None:
        row = (key, wanted, receipt.lsn, json.dumps(receipt.task_ids), created)
        with self._db_lock, self._writer():  # one statement: its own transaction
            self._db.execute("INSERT OR REPLACE INTO keys VALUES (?, ?, ?, ?, ?)", row)

    def _purge(self, oldest: float) -> None:
        with self._writing():
            self._db.execute("DELETE FROM keys WHERE created <= ?", (oldest,))
            self._db.execute("DELETE FROM carried WHERE key NOT IN (SELECT key FROM keys)")

    def note_carried(self, moves: list[tuple[str, int, int]]) -> None:
        """The pump carried these keyed records forward: (key, origin LSN, new LSN)."""
        if moves:
            with self._writing():
                self._db.executemany(_NOTE_CARRIED, moves)

    # ---------------------------------------------------------------- locks and slots
    @contextlib.contextmanager
    def _stripe(self, stripe: int) -> Iterator[None]:
        offset = stripe * _SLOT.size
        with self._threads[stripe]:
            _lock(self._fd, offset, 1)
            try:
                yield
            finally:
                _unlock(self._fd, offset, 1)

    @contextlib.contextmanager
    def _writer(self) -> Iterator[None]:
        _lock(self._fd, _WRITER, 1)
        try:
            yield
        finally:
            _unlock(self._fd, _WRITER, 1)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """One SQLite write transaction at a time across processes (and threads)."""
        with self._db_lock, self._writer():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _mark(self, stripe: int, key: str, scan_from: int) -> None:
        slot = _SLOT.pack(scan_from + 1, _hash(key), os.getpid())
        os.pwrite(self._fd, slot, stripe * _SLOT.size)

    def _clear(self, stripe: int) -> None:
        os.pwrite(self._fd, bytes(_SLOT.size), stripe * _SLOT.size)

    def _slot(self, stripe: int) -> tuple[int, bytes] | None:
        raw = os.pread(self._fd, _SLOT.size, stripe * _SLOT.size)
        if len(raw) < _SLOT.size or not any(raw):
            return None
        start, key_hash, _pid = _SLOT.unpack(raw)
        return start - 1, key_hash

    # ---------------------------------------------------------------- recovery
    def _resolve(self, stripe: int, wal: Wal, window: float | None) -> None:
        """Index what a sender that died holding this stripe may have appended."""
        slot = self._slot(stripe)
        if slot is None:
            return
        scan_from, key_hash = slot
        self._index_log(wal, scan_from, window, key_hash)
        self._clear(stripe)

    def _recover(self, wal: Wal) -> None:
        """At open: after a reboot (or on a new index) index every keyed record still in
        the log; else resolve the slots of senders that died."""
        self._forget_lost(wal)
        booted = boot_id()
        if self._meta("boot_id") != booted:
            with self._every_stripe():
                if self._meta("boot_id") != booted:
                    self._index_log(wal, 0, None, None)
                    os.pwrite(self._fd, bytes(_WRITER), 0)
                    with self._writing():
                        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('boot_id', ?)",
                                         (booted,))  # fmt: skip
        raw = os.pread(self._fd, _WRITER, 0)
        for stripe in range(STRIPES):
            if any(raw[stripe * _SLOT.size : (stripe + 1) * _SLOT.size]):
                with self._stripe(stripe):
                    self._resolve(stripe, wal, None)

    def _forget_lost(self, wal: Wal) -> None:
        """After ``walstore repair`` accepted a lost end of the log: rows naming LSNs from
        there on name lost records (or, later, the new records that took their LSNs):
        drop them, then index what the log holds from there."""
        tails = wal.lost_tails()
        if tails == self._seen_losses():
            return
        with self._every_stripe():
            seen = self._seen_losses()
            if tails == seen:
                return
            common = 0  # entries both lists start with: already applied
            while common < min(len(seen), len(tails)) and seen[common] == tails[common]:
                common += 1
            # New entries; or LOSSES was started again (repair of a damaged one) shorter
            # than what was seen: then everything it names counts again.
            fresh = tails[common:] or tails
            lost = min(fresh) if fresh else None
            gone = [] if lost is None else self._carried_away(wal, lost)
            with self._writing():
                if lost is not None:
                    self._db.execute("DELETE FROM keys WHERE lsn >= ?", (lost,))
                    self._db.executemany("DELETE FROM keys WHERE key = ?", [(k,) for k in gone])
                    self._db.execute("DELETE FROM carried WHERE at >= ? OR origin >= ?",
                                     (lost, lost))  # fmt: skip
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('lost_tails', ?)",
                                 (json.dumps(tails),))  # fmt: skip
            if lost is not None:
                self._index_log(wal, lost, None, None)

    def _carried_away(self, wal: Wal, lost: int) -> list[str]:
        """The keys whose record the pump carried forward to ``lost`` or past it, and of
        which no copy is left to deliver: neither the original nor an earlier copy is
        still at or above the low water mark (the next pump replays those: their record
        was not lost, and their key keeps its first answer)."""
        with self._db_lock:
            rows = self._db.execute(
                "SELECT k.key, k.lsn FROM keys k JOIN carried c ON c.key = k.key"
                " AND c.origin = k.lsn WHERE c.at >= ? AND k.lsn < ?", (lost, lost)
            ).fetchall()  # fmt: skip
        wanted = {str(key): int(lsn) for key, lsn in rows}
        start = max(wal.low_water_mark(), wal.first_lsn())
        if not wanted or start >= min(lost, wal.high_water_mark()):
            return list(wanted)
        try:
            for lsn, payload in wal.iter_from(start):
                if lsn >= lost:
                    break
                try:
                    entry = decode(payload)
                except BadRecordError:
                    continue
                if entry.key in wanted and entry.identity(lsn) == wanted[entry.key]:
                    del wanted[entry.key]
                    if not wanted:
                        break
        except (WalError, OSError):
            return []  # unreadable here: keep the rows' answers (the pump reports it)
        return list(wanted)

    @contextlib.contextmanager
    def _every_stripe(self) -> Iterator[None]:
        """Every stripe at once (and so no send runs), across processes."""
        _lock(self._fd, 0, _WRITER)
        try:
            yield
        finally:
            _unlock(self._fd, 0, _WRITER)

    def _seen_losses(self) -> list[int]:
        raw = self._meta("lost_tails")
        return [] if raw is None else [int(n) for n in json.loads(raw)]

    def _index_log(
        self, wal: Wal, scan_from: int, window: float | None, key_hash: bytes | None
    ) -> None:
        """Index the keyed records from ``scan_from`` (``key_hash``: of that key only) up
        to the durable end, keeping the first record of each key (a dead-letter replay
        repeats its key later). ``window`` None: every record (purged later)."""
        end = wal.sync()  # what a dead sender wrote becomes durable (or never will)
        start = max(scan_from, wal.first_lsn())
        rows: dict[str, tuple[Any, ...]] = {}
        moves: dict[str, tuple[str, int, int]] = {}  # key -> its newest carried copy
        if start < end:
            for lsn, payload in wal.iter_from(start):
                if lsn >= end:
                    break
                try:
                    entry = decode(payload)
                    entry_digest = digest(entry)
                except (BadRecordError, NotSerializableError):
                    continue  # the pump dead-letters it; it indexes nothing
                key, created = entry.key, entry.created
                if not key or created is None:
                    continue  # unkeyed, or version 1 (sent before there was an index)
                if key_hash is not None and _hash(key) != key_hash:
                    continue
                if entry.origin is not None:
                    moves[key] = (key, entry.origin, lsn)
                if key in rows and rows[key][4] >= created:
                    continue  # the same send again (replay, carried forward): keep the first
                receipt = receipt_of(wal.wal_id, lsn, entry)
                rows[key] = (key, entry_digest, receipt.lsn, json.dumps(receipt.task_ids),
                             created)  # fmt: skip
        oldest = -1.0 if window is None else time.time() - window
        live = [r for r in rows.values() if r[4] > oldest]
        if live or moves:
            with self._writing():
                # A row of the same send (or a later one) was inserted by its sender: it
                # stays; an expired row of an earlier send is replaced.
                self._db.executemany(_UPSERT_NEWER, live)
                self._db.executemany(_NOTE_CARRIED, list(moves.values()))

    def close(self) -> None:
        self.closed = True
        db = getattr(self, "_db", None)  # None: the open failed before it
        if db is not None:
            with self._db_lock:
                db.close()
        _indexes.discard(self)  # first: a fork must not close a number soon reused
        if self._fd >= 0:
            os.close(self._fd)  # drops this process's locks on keys.lock: none are held now
            self._fd = -1

    def forget_after_fork(self) -> None:
        """In a forked child: let go of the parent's descriptor on ``keys.lock``. An open
        file description lock lives as long as any descriptor of it, so a parent killed
        while a thread of it held a stripe would otherwise leave that stripe locked for
        as long as this child lives. The child opens an index of its own."""
        self.closed = True
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1

    def _meta(self, name: str) -> str | None:
        with self._db_lock:
            row = self._db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return None if row is None else str(row[0])


def _in_log(wal: Wal, key: str, lsn: int) -> bool:
    """Whether the record a row names is still what the log holds at its LSN, or was
    pruned (confirmed). Not so when the log lost its end (``walstore repair`` accepted
    a lost tail, or an older copy was restored): the LSN is past the end, or a new record
    took it. Read on a key's hit only: a retry, not every send."""
    if lsn < wal.first_lsn():
        return True  # pruned: its tasks were confirmed
    if lsn >= wal.high_water_mark():
        return lsn < wal.next_lsn()  # appended, not yet durable: only by a live sender
    reader = wal.reader(lsn)
    try:
        records = reader.read(1)
    except (WalError, OSError):
        return True  # unreadable here: the pump reports it; keep the row's answer
    finally:
        reader.close()
    if not records or records[0][0] != lsn:
        return False
    try:
        return decode(records[0][1]).key == key
    except (BadRecordError, NotSerializableError):
        return False


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _hash(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


_registry_lock = threading.Lock()
_registry: dict[tuple[int, str], KeyIndex] = {}


def _lock(fd: int, start: int, length: int) -> None:
    """Wait for, then take, bytes [start, start + length) of ``keys.lock``."""
    if _OFD:
        lock = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, start, length, 0)
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, lock)
    else:
        fcntl.lockf(fd, fcntl.LOCK_EX, length, start)


def _unlock(fd: int, start: int, length: int) -> None:
    if _OFD:
        fcntl.fcntl(
            fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, start, length, 0)
        )
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN, length, start)


# Every index with its descriptor, those being built too: a forked child lets go of them.
_indexes = ForgetInChild(KeyIndex.forget_after_fork)


def _after_fork_in_child() -> None:
    """The parent's indexes are not the child's (they are found by pid)."""
    global _registry_lock
    _registry_lock = threading.Lock()  # another thread of the parent may have held it
    _registry.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def index_for(wal: Wal) -> KeyIndex:
    """This process's index of ``wal``'s directory: one per process and directory, since
    its thread locks are what order the process's own threads (a second index would take
    the byte-range locks on another open file, where a thread holding a stripe in one
    would wait for itself in the other). Never shared across a fork."""
    directory = os.path.realpath(wal.directory)
    key = (os.getpid(), directory)
    with _registry_lock:
        index = _registry.get(key)
        if index is None:
            index = _registry[key] = KeyIndex(directory, wal)
        return index


def close_index(directory: str) -> None:
    """Close this process's index of ``directory`` (a later send opens it again)."""
    with _registry_lock:
        index = _registry.pop((os.getpid(), os.path.realpath(directory)), None)
    if index is not None:
        index.close()
