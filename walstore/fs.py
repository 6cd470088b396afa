"""The file layer: every byte walstore writes or reads goes through one of these methods,
so tests can swap in a fault-injecting layer (drop unsynced data, fail an fsync, ENOSPC),
as RocksDB's FaultInjectionTestFS does."""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from .errors import WalError

FILE_MODE = 0o600
DIR_MODE = 0o700


def open_private(path: str, flags: int, mode: int = FILE_MODE) -> int:
    """``os.open``; a file it creates gets exactly ``mode`` whatever the umask."""
    fd = os.open(path, flags | os.O_CLOEXEC, mode)
    try:
        st_mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(st_mode):  # opens read-only; every read then fails naming nothing
            raise IsADirectoryError(errno.EISDIR, "a directory where a file should be", path)
        if flags & os.O_CREAT and st_mode & 0o7777 != mode:
            os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_private_dirs(path: str) -> None:
    """Create ``path`` and any missing parent, each 0700 whatever the umask (unlike
    ``os.makedirs``, whose mode is not applied to the parents it creates)."""
    path = os.path.abspath(path)
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for d in reversed(missing):
        try:
            os.mkdir(d, DIR_MODE)
        except FileExistsError:
            if not os.path.isdir(d):  # a file in its place (or among its parents)
                why = "not a directory (a log needs one)"
                raise NotADirectoryError(errno.ENOTDIR, why, d) from None
            continue  # another process made it first: it checks it, as we do next
        os.chmod(d, DIR_MODE)


def check_private_dir(path: str) -> None:
    """Refuse a log directory that another user could write to, or that is not ours:
    they could swap its files under the log (as PostgreSQL and ssh refuse)."""
    st = os.stat(path)
    if st.st_uid != os.geteuid():
        raise WalError(
            f"{path} is owned by uid {st.st_uid}, not by this process's user (uid "
            f"{os.geteuid()}): run as its owner, or chown it to this user"
        )
    if st.st_mode & 0o022:
        who = " and ".join(
            w for w, bit in (("group", 0o020), ("others", 0o002)) if st.st_mode & bit
        )
        raise WalError(
            f"{path} is writable by {who} (mode {oct(st.st_mode & 0o777)}), who could then "
            f"replace the log's files: chmod 700 {path}"
        )


def prepare_log_dir(path: str) -> None:
    """Create the log directory privately, or check the one that exists."""
    if not os.path.isdir(path):
        make_private_dirs(path)
    check_private_dir(path)


class OsFs:
    """The real thing: thin wrappers over ``os`` that finish partial writes."""

    def open(self, path: str, flags: int, mode: int = FILE_MODE) -> int:
        return open_private(path, flags, mode)

    def close(self, fd: int) -> None:
        os.close(fd)

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        return os.pread(fd, size, offset)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def ftruncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def fsize(self, fd: int) -> int:
        return os.fstat(fd).st_size

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def size(self, path: str) -> int:
        return os.stat(path).st_size

    def free_bytes(self, path: str) -> int:
        st = os.statvfs(path)
        return st.f_bavail * st.f_frsize

    def write_file_atomic(self, directory: str, name: str, data: bytes) -> None:
        """Replace ``directory/name`` with ``data``: temp file, fsync, rename, fsync dir."""
        tmp = os.path.join(directory, f"{name}.{os.getpid()}.tmp")
        fd = self.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            try:
                self.pwrite(fd, data, 0)
                self.fsync(fd)
            finally:
                self.close(fd)
        except OSError:
            with contextlib.suppress(OSError):
                self.unlink(tmp)
            raise
        self.rename(tmp, os.path.join(directory, name))
        self.fsync_dir(directory)

    def read_file(self, path: str) -> bytes:
        fd = self.open(path, os.O_RDONLY)
        try:
            return self.pread(fd, self.fsize(fd), 0)
        finally:
            self.close(fd)
