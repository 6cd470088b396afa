"""A fault-injecting file layer for walstore tests, after RocksDB's FaultInjectionTestFS.

``FaultFs`` passes every call through to the real files (so reads see what a running
process would see: the page cache) and remembers what is not durable yet:

- per file, every write and truncate not yet covered by an fdatasync/fsync of that file,
  as an undo record (offset, the bytes it overwrote, the size before it);
- per directory, every create, rename and unlink not yet covered by an fsync of that
  directory, with the durable content of any file a rename replaced or an unlink removed.

``crash()`` is a power cut: it reverts every unsynced write (optionally keeping an ordered
prefix of them, the last one possibly torn, to model partial writeback), then undoes every
unsynced directory operation, newest first. A test kills the process side first with
``wal._abandon()`` (drop handles without flushing), then calls ``crash()``, then opens the
log again: that is recovery.

Errors are injected with ``inject`` (an OSError on matching calls: EIO from an fsync,
ENOSPC from a write, optionally after writing part of the data) and ``kill_after`` (the
process dies at a given mutating call: ``SimulatedCrash`` is raised and every later call
fails the same way until ``crash()``, so no clean-up code of the dead process reaches the
disk). The shm and lock files do not go through the file layer: they are not durable state.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

from walstore.fs import OsFs

# Operations that change durable state; kill_after counts these.
MUTATING = frozenset(
    {"create", "pwrite", "ftruncate", "fdatasync", "fsync", "fsync_dir", "rename", "unlink"}
)


class SimulatedCrash(BaseException):
    """The simulated process died here (BaseException: no ``except Exception`` in the code
    under test may swallow it, as none could catch a SIGKILL)."""


class _File:
    """One file (an inode): its current path, None once unlinked or replaced."""

    def __init__(self, path: str | None) -> None:
        self.path = path


@dataclass
class _Undo:
    """How to revert one write or truncate: put ``old`` back at ``offset``, then resize."""

    file: _File
    offset: int
    old: bytes
    old_size: int
    length: int  # bytes the write put down (0 for a truncate): what tearing can cut


@dataclass
class _DirOp:
    kind: str  # "create", "rename" or "unlink"
    path: str  # the created path, the rename's destination, the unlinked path
    src: str = ""  # the rename's source
    image: bytes | None = None  # durable content of the file a rename replaced / unlink removed


@dataclass
class Fault:
    """Fail matching calls of ``op`` with ``OSError(err)``."""

    op: str
    err: int
    match: str = ""  # substring of the path; "" matches every path
    skip: int = 0  # let this many matching calls succeed first
    times: int | None = 1  # how many calls fail; None: every one until cleared
    partial: int = 0  # pwrite only: bytes actually written before the error
    # pwrite only: fail just the writes that would grow the file, as a full disk does
    # (overwriting blocks already allocated needs no space).
    growing: bool = False
    hits: int = field(default=0, init=False)


def revert(buf: bytearray, undo: _Undo, keep: int = 0) -> None:
    """Revert ``undo`` in ``buf`` except its first ``keep`` bytes (a torn write)."""
    start = undo.offset + keep
    old = undo.old[keep:]
    if len(buf) < start + len(old):
        buf.extend(bytes(start + len(old) - len(buf)))
    buf[start : start + len(old)] = old
    size = max(undo.old_size, start) if keep else undo.old_size
    if len(buf) > size:
        del buf[size:]
    else:
        buf.extend(bytes(size - len(buf)))


class FaultFs(OsFs):
    """OsFs that can forget unsynced data (``crash``) and inject errors (``inject``)."""

    def __init__(self) -> None:
        self._files: dict[str, _File] = {}
        self._fds: dict[int, _File] = {}
        self._writes: list[_Undo] = []  # unsynced data operations, oldest first
        self._dir_ops: list[_DirOp] = []  # unsynced directory operations, oldest first
        self._faults: list[Fault] = []
        self._kill_in: int | None = None
        self._dead = False
        self.calls: Counter[str] = Counter()
        self.free_bytes_value: int | None = None  # what free_bytes reports, when set

    # ------------------------------------------------------------- fault control
    def inject(
        self,
        op: str,
        err: int,
        *,
        match: str = "",
        skip: int = 0,
        times: int | None = 1,
        partial: int = 0,
        growing: bool = False,
    ) -> Fault:
        fault = Fault(op, err, match, skip, times, partial, growing)
        self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        self._faults.clear()
        self._kill_in = None

    def kill_after(self, n: int) -> None:
        """Let ``n`` mutating calls happen; the next one (and everything after) dies."""
        self._kill_in = n

    def revive(self) -> None:
        """The process died but the machine did not: unsynced data stays (page cache),
        still unsynced; faults are cleared and calls work again."""
        self.clear_faults()
        self._dead = False

    @property
    def dead(self) -> bool:
        return self._dead

    @property
    def unsynced_writes(self) -> int:
        return len(self._writes)

    @property
    def unsynced_dir_ops(self) -> int:
        return len(self._dir_ops)

    def _enter(self, op: str, path: str | None, grows: bool = False) -> Fault | None:
        """Count the call; die or fail if armed to; returns a partial-write fault."""
        if self._dead:
            raise SimulatedCrash(f"{op} after the simulated crash")
        self.calls[op] += 1
        if op in MUTATING and self._kill_in is not None:
            if self._kill_in == 0:
                self._dead = True
                raise SimulatedCrash(f"killed at {op} {path}")
            self._kill_in -= 1
        for fault in self._faults:
            if fault.op != op or (fault.match and fault.match not in (path or "")):
                continue
            if fault.growing and not grows:
                continue
            fault.hits += 1
            if fault.hits <= fault.skip:
                continue
            if fault.times is not None and fault.hits > fault.skip + fault.times:
                continue
            if op == "pwrite" and fault.partial:
                return fault
            raise OSError(fault.err, os.strerror(fault.err), path)
        return None

    def _path_of(self, fd: int) -> str | None:
        file = self._fds.get(fd)
        return file.path if file else None

    def _file(self, path: str) -> _File:
        file = self._files.get(path)
        if file is None:
            file = self._files[path] = _File(path)
        return file

    # ------------------------------------------------------------- file operations
    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        existed = os.path.exists(path)
        creating = bool(flags & os.O_CREAT) and not existed
        if creating:
            self._enter("create", path)
        elif self._dead:
            raise SimulatedCrash(f"open {path} after the simulated crash")
        truncating = existed and bool(flags & os.O_TRUNC) and os.path.getsize(path) > 0
        if truncating:
            self._enter("ftruncate", path)
            with open(path, "rb") as f:
                old = f.read()
        fd = super().open(path, flags, mode)
        file = self._file(path)
        self._fds[fd] = file
        if creating:
            self._dir_ops.append(_DirOp("create", path))
        if truncating:
            self._writes.append(_Undo(file, 0, old, len(old), 0))
        return fd

    def close(self, fd: int) -> None:
        # Closing is allowed even when dead: it releases descriptors, nothing durable.
        self._fds.pop(fd, None)
        super().close(fd)

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> None:
        path = self._path_of(fd)
        fault = self._enter("pwrite", path, offset + len(data) > os.fstat(fd).st_size)
        view = memoryview(data)
        if fault is not None:
            view = view[: min(fault.partial, len(view))]
        file = self._fds.get(fd) or _File(path)
        old_size = os.fstat(fd).st_size
        old = _read_at(fd, len(view), offset) if offset < old_size else b""
        self._writes.append(_Undo(file, offset, old, old_size, len(view)))
        super().pwrite(fd, view, offset)
        if fault is not None:
            raise OSError(fault.err, os.strerror(fault.err), path)

    def ftruncate(self, fd: int, size: int) -> None:
        path = self._path_of(fd)
        self._enter("ftruncate", path)
        old_size = os.fstat(fd).st_size
        old = _read_at(fd, old_size - size, size) if size < old_size else b""
        file = self._fds.get(fd) or _File(path)
        self._writes.append(_Undo(file, size, old, old_size, 0))
        super().ftruncate(fd, size)

    def fdatasync(self, fd: int) -> None:
        self._enter("fdatasync", self._path_of(fd))
        super().fdatasync(fd)
        self._synced(fd)

    def fsync(self, fd: int) -> None:
        self._enter("fsync", self._path_of(fd))
        super().fsync(fd)
        self._synced(fd)

    def _synced(self, fd: int) -> None:
        file = self._fds.get(fd)
        self._writes = [u for u in self._writes if u.file is not file]

    def rename(self, src: str, dst: str) -> None:
        self._enter("rename", dst)
        image = self._durable_image(dst) if os.path.exists(dst) else None
        super().rename(src, dst)
        self._forget(dst)
        file = self._files.pop(src, None) or _File(src)
        file.path = dst
        self._files[dst] = file
        self._dir_ops.append(_DirOp("rename", dst, src, image))

    def unlink(self, path: str) -> None:
        self._enter("unlink", path)
        image = self._durable_image(path) if os.path.exists(path) else None
        super().unlink(path)
        self._forget(path)
        self._dir_ops.append(_DirOp("unlink", path, image=image))

    def fsync_dir(self, path: str) -> None:
        self._enter("fsync_dir", path)
        super().fsync_dir(path)
        directory = os.path.abspath(path)
        self._dir_ops = [
            op
            for op in self._dir_ops
            if os.path.dirname(os.path.abspath(op.path)) != directory
            and (not op.src or os.path.dirname(os.path.abspath(op.src)) != directory)
        ]

    def free_bytes(self, path: str) -> int:
        if self.free_bytes_value is not None:
            return self.free_bytes_value
        return super().free_bytes(path)

    def _forget(self, path: str) -> None:
        """The file at ``path`` is gone from the namespace: its unsynced data no longer
        matters (a crash restores its durable image, or nothing)."""
        file = self._files.pop(path, None)
        if file is not None:
            file.path = None
            self._writes = [u for u in self._writes if u.file is not file]

    def _durable_image(self, path: str) -> bytes:
        with open(path, "rb") as f:
            buf = bytearray(f.read())
        file = self._files.get(path)
        for undo in reversed(self._writes):
            if undo.file is file:
                revert(buf, undo)
        return bytes(buf)

    # ------------------------------------------------------------- power loss
    def crash(self, keep_writes: int = 0, tear: int | None = None, keep_dir_ops: int = 0) -> None:
        """Lose everything unsynced, as a power cut would.

        ``keep_writes``: the oldest unsynced writes that reached the disk anyway (in
        order); ``tear``: of the last kept write only its first ``tear`` bytes did;
        ``keep_dir_ops``: likewise for the oldest unsynced directory operations."""
        for fd in list(self._fds):
            self.close(fd)
        keep = min(keep_writes, len(self._writes))
        reverts = [(u, 0) for u in reversed(self._writes[keep:])]
        if keep and tear is not None and 0 <= tear < self._writes[keep - 1].length:
            reverts.append((self._writes[keep - 1], tear))
        for file in {id(u.file): u.file for u, _ in reverts}.values():
            if file.path is not None and os.path.exists(file.path):
                _rewrite(file.path, [(u, k) for u, k in reverts if u.file is file])
        for op in reversed(self._dir_ops[keep_dir_ops:]):
            _undo_dir_op(op)
        self._files.clear()
        self._writes.clear()
        self._dir_ops.clear()
        self.revive()


def _rewrite(path: str, reverts: list[tuple[_Undo, int]]) -> None:
    """Apply ``reverts`` (newest first) to the file at ``path``."""
    with open(path, "rb") as f:
        buf = bytearray(f.read())
    for undo, keep in reverts:
        revert(buf, undo, keep)
    with open(path, "r+b") as f:
        f.write(buf)
        f.truncate(len(buf))


def _read_at(fd: int, size: int, offset: int) -> bytes:
    """Read through a fresh descriptor: ``fd`` may be write-only."""
    with open(f"/proc/self/fd/{fd}", "rb") as f:
        f.seek(offset)
        return f.read(size)


def _undo_dir_op(op: _DirOp) -> None:
    if op.kind == "rename" and os.path.exists(op.path):
        os.rename(op.path, op.src)
    elif op.kind == "create" and os.path.exists(op.path):
        os.unlink(op.path)
    if op.image is not None:
        fd = os.open(op.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(op.image)
