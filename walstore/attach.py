"""Attaching to a log: who recovers it, and when a process may trust the shared state.

Every lock here is dropped by the kernel when its process dies:

- The log directory itself (flock): exclusive while a process recovers or repairs the
  log, shared by every process that has it open. No ``rm`` of a lock file can remove it,
  so two recoveries never run side by side (the review deleted ``LOCK`` under a running
  appender and got every later opener recovering beside it: LSNs handed out twice).
- ``LOCK`` (flock), taken in the same modes after the directory: a process of the
  previous release, which knows only LOCK, then never recovers beside us either.
- The *live* mark: an OFD read lock on the directory, taken once a process is attached.
  The shared state is trusted only while another process holds the mark: that process
  recovered the log or attached to a trusted state, and has not died since. A state left
  by processes that all died, or rebuilt by nobody (a repair, a probe), is never trusted:
  whoever gets the directory exclusively recovers instead. The mark is asked about with
  F_OFD_GETLK, which takes nothing, so asking never gets in anyone's way.

The shared state records the identity (device, inode) of itself and of every lock file it
was built with; a process attaches only if the files it opened are those. A file removed
or replaced while processes have the log open is refused by name, at once (the fstat-vs-
stat check of SQLite and others, made against what the attached processes use).
``walstore repair`` marks the shared state while it runs, so an opener is refused at once
with LogBusyError instead of waiting behind it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import struct
import time
from collections.abc import Callable

from .errors import CorruptLogError, LogAttachError, LogBusyError
from .forks import ForgetInChild
from .fs import open_private
from .shm import SharedState, WriteLock, WriteState, repairing_pid

LOCK = "LOCK"
SHM = "shm"
APPEND_LOCK = "append.lock"
# Give up attaching after this long without a verdict: only a process that holds the
# attach lock without showing itself live (a previous release) can make that happen.
ATTACH_TIMEOUT = 10.0

_FLOCK = struct.Struct("hhqqi4x")  # struct flock (Linux, 64-bit off_t)
_LIVE_BYTE = 0


def _ofd(fd: int, cmd: int, kind: int) -> int:
    """An OFD record lock call on the live byte; returns the lock type it reports."""
    raw = fcntl.fcntl(fd, cmd, _FLOCK.pack(kind, os.SEEK_SET, _LIVE_BYTE, 1, 0))
    return int(_FLOCK.unpack(raw)[0])


def _others_live(dir_fd: int) -> bool:
    """True if an open file other than ``dir_fd``'s holds the live mark."""
    return _ofd(dir_fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK) != fcntl.F_UNLCK


def others_attached(directory: str) -> bool:
    """True if some process has the log in ``directory`` open right now (takes no lock)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        return _others_live(fd)
    finally:
        os.close(fd)


def _try_flock(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


SHARED_FILES = (LOCK, SHM, APPEND_LOCK)


def check_shared_files(directory: str) -> None:
    """CorruptLogError naming a lock or shared-state file that is not a file (a directory
    in its place): no process can open the log then, so every reader says so, and
    ``walstore repair`` moves it aside (it holds no record)."""
    for name in SHARED_FILES:
        path = os.path.join(directory, name)
        if os.path.lexists(path) and not os.path.isfile(path):
            raise CorruptLogError(
                name, 0, f"a directory (or other non-file) where walstore keeps its {name}: "
                "no process can open the log; walstore repair moves it aside"
            )  # fmt: skip


class AttachLock:
    """The directory lock, LOCK, and the live mark of one process (see the module doc)."""

    def __init__(self, directory: str) -> None:
        self._dir = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            path = os.path.join(directory, LOCK)
            self._lock = open_private(path, os.O_RDWR | os.O_CREAT)
        except BaseException:
            os.close(self._dir)
            raise

    def try_exclusive(self) -> bool:
        """Exclusive, without waiting: nobody else has the log open or is recovering it."""
        if not _try_flock(self._dir, fcntl.LOCK_EX):
            return False
        if not _try_flock(self._lock, fcntl.LOCK_EX):
            fcntl.flock(self._dir, fcntl.LOCK_UN)
            return False
        return True

    def shared(self) -> None:
        """Shared: waits while someone recovers or repairs the log."""
        fcntl.flock(self._dir, fcntl.LOCK_SH)
        fcntl.flock(self._lock, fcntl.LOCK_SH)

    def downgrade(self) -> None:
        """Exclusive to shared, after ``mark_live``. flock converts by unlocking first:
        LOCK goes first, while the directory still keeps our own kind out; whoever slips
        in when the directory turns finds the live mark and attaches to our state."""
        fcntl.flock(self._lock, fcntl.LOCK_SH)
        fcntl.flock(self._dir, fcntl.LOCK_SH)

    def mark_live(self) -> None:
        _ofd(self._dir, fcntl.F_OFD_SETLK, fcntl.F_RDLCK)

    def others_live(self) -> bool:
        return _others_live(self._dir)

    def release(self) -> None:
        _ofd(self._dir, fcntl.F_OFD_SETLK, fcntl.F_UNLCK)
        fcntl.flock(self._lock, fcntl.LOCK_UN)
        fcntl.flock(self._dir, fcntl.LOCK_UN)

    @property
    def fd(self) -> int:
        return self._lock

    @property
    def dir_fd(self) -> int:
        return self._dir

    def close(self) -> None:
        os.close(self._lock)  # closing drops every lock of these open files
        os.close(self._dir)


_NOBODY_LIVE = "nobody live"


class Attachment:
    """What a process holds while it has the log open: the attach locks, the shared
    state and the write lock."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        check_shared_files(directory)
        self.lock = AttachLock(directory)
        self._files: list[WriteLock | SharedState] = []
        self.forked_away = False
        _attachments.add(self)

    # The shared files are opened by path once the attach locks are held (a recoverer
    # records what it opened; an attacher compares), and only then.
    def _open_files(self) -> None:
        join = os.path.join
        try:
            self.shm = SharedState(join(self.directory, SHM))
            self._files.append(self.shm)
            self.wlock = WriteLock(join(self.directory, APPEND_LOCK), self.shm)
            self._files.append(self.wlock)
        except BaseException:
            self._close_files()
            raise

    def _close_files(self) -> None:
        for item in reversed(self._files):
            item.close()
        self._files.clear()

    def _identities(self) -> list[tuple[str, tuple[int, int]]]:
        return [(SHM, self.shm.identity()), (APPEND_LOCK, self.wlock.identity())]

    def attach(self, recover: Callable[[], WriteState], timeout: float = ATTACH_TIMEOUT) -> None:
        """Recover the log if nobody has it open, else attach to the shared state; raises
        LogBusyError while a repair runs, LogAttachError if the shared files were removed
        or replaced under the processes that have the log open."""
        deadline = time.monotonic() + timeout
        pause = 0.001
        while True:
            if self.lock.try_exclusive():
                self._recover(recover)
                return
            pid = repairing_pid(os.path.join(self.directory, SHM))
            if pid is not None:
                raise LogBusyError(
                    f"walstore repair (pid {pid}) is running on {self.directory}: open the "
                    "log again once it has finished"
                )
            self.lock.shared()
            self._open_files()
            refusal = self._refusal()
            if refusal is None:
                self.lock.mark_live()
                return
            self._close_files()
            self.lock.release()
            if refusal != _NOBODY_LIVE:
                raise LogAttachError(f"cannot open the log in {self.directory}: {refusal}")
            if time.monotonic() > deadline:
                raise LogAttachError(
                    f"cannot open the log in {self.directory}: for {timeout:.0f} s another "
                    "process held its attach lock without having the log open (a process "
                    "of an older walstore release?); stop it, then open the log again"
                )
            time.sleep(random.uniform(pause / 2, pause))  # another opener goes first
            pause = min(pause * 2, 0.05)

    def _recover(self, recover: Callable[[], WriteState]) -> None:
        try:
            self._open_files()
            state = recover()
            self.shm.initialise(state, state.next_lsn, [i for _, i in self._identities()])
            self.lock.mark_live()
            self.lock.downgrade()
        except BaseException:
            if self._files:
                self.shm.invalidate()
            self._close_files()
            self.lock.release()
            raise

    def _refusal(self) -> str | None:
        """Why the shared state cannot be trusted (attach locks held shared), or None."""
        if not self.lock.others_live():
            return _NOBODY_LIVE  # left by dead processes, or mid-recovery: recover
        advice = (
            "while processes have the log open; stop them all (or wait until they have "
            "closed it), then open it again"
        )
        if not self.shm.is_valid():
            return (
                f"the shared state file {SHM} is not the one the processes that have the "
                f"log open use: it was removed or replaced {advice}"
            )
        recorded = self.shm.identities()
        mine = self._identities()
        for i, (name, ident) in enumerate(mine):
            if i >= len(recorded) or recorded[i] != ident:
                return f"{name} was removed or replaced {advice}"
        return None

    def forget_after_fork(self) -> None:
        """In a forked child: close this process's copies of the descriptors that hold
        the parent's locks, and only close them (see walstore.forks): kept open, they
        would keep the write lock taken, and the log looking open to every other
        process, after the parent died."""
        self.forked_away = True
        for fd in [self.lock.fd, self.lock.dir_fd, *(fd for f in self._files for fd in f.fds())]:
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        if self.forked_away:
            return  # closed at the fork; the descriptor numbers may be another file's now
        # First: a fork from now on must not close these numbers, soon another file's.
        _attachments.discard(self)
        self._close_files()
        with contextlib.suppress(OSError):
            self.lock.close()


_attachments = ForgetInChild(Attachment.forget_after_fork)
