"""The file layer: every byte walstore writes or reads goes through one of these methods,
so tests can swap in a fault-injecting layer (drop unsynced data, fail an fsync, ENOSPC),
as RocksDB's FaultInjectionTestFS does."""

from __future__ import annotations

import contextlib
import os


class OsFs:
    """The real thing: thin wrappers over ``os`` that finish partial writes."""

    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        return os.open(path, flags | os.O_CLOEXEC, mode)

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
