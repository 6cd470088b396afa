"""Sleep until a 32-bit word of a shared file mapping changes, and wake every sleeper: the
futex(2) of Linux, through ctypes (the standard library has no binding).

Used for one thing: the group-commit broadcast. The flush leader bumps a sequence word
and wakes everyone at once; a producer reads the word, checks whether its records are
durable, and sleeps only if the word still holds what it read (so a wake-up between the
check and the sleep is never lost). On a shared file mapping a futex is keyed by inode
and offset, so it works across processes and PID namespaces (containers sharing the log
directory); a process killed while asleep leaves nothing behind. Sleeps are bounded by a
timeout: a leader that dies before waking anyone delays its followers by that long.

Where futex(2) cannot be called (another OS, an unknown CPU), ``wait`` polls instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import platform
import time

# futex(2) system call numbers; FUTEX_WAIT and FUTEX_WAKE, shared (not PRIVATE) variants.
_SYS_FUTEX = {"x86_64": 202, "amd64": 202, "aarch64": 98, "arm64": 98, "riscv64": 98}
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1
_WAKE_ALL = 0x7FFFFFFF


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


def _syscall() -> tuple[object, int] | None:
    number = _SYS_FUTEX.get(platform.machine().lower())
    if number is None:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.syscall
    except (OSError, AttributeError):
        return None
    call.restype = ctypes.c_long
    return call, number


_FUTEX = _syscall()


class Word:
    """A 32-bit word at ``offset`` of ``mm`` (4-byte aligned) to wait on and wake."""

    def __init__(self, mm: mmap.mmap, offset: int) -> None:
        self._word = ctypes.c_uint32.from_buffer(mm, offset)
        self._addr = ctypes.c_void_p(ctypes.addressof(self._word))
        # The call's arguments, made once: a follower waits once per append.
        self._seen = ctypes.c_uint32(0)
        self._timespec = _Timespec(0, 0)
        self._timeout = -1.0
        if _FUTEX is not None:
            self._call, number = _FUTEX
            self._number = ctypes.c_long(number)
            self._wait_op, self._wake_op = ctypes.c_int(_FUTEX_WAIT), ctypes.c_int(_FUTEX_WAKE)
            self._all = ctypes.c_uint32(_WAKE_ALL)
            self._zero = ctypes.c_uint32(0)

    @property
    def value(self) -> int:
        return int(self._word.value)

    def bump(self) -> None:
        """Add one (wrapping). Only ever done by one process at a time (the flush leader,
        under the write lock): a plain store is enough."""
        self._word.value = (self._word.value + 1) & 0xFFFFFFFF

    def wait(self, seen: int, timeout: float) -> None:
        """Sleep while the word is ``seen``, at most ``timeout`` seconds (returns early
        if it is not ``seen`` any more, or on a wake-up or a signal)."""
        if _FUTEX is None:
            time.sleep(min(timeout, 0.0002))
            return
        if timeout != self._timeout:
            secs = int(timeout)
            self._timespec.tv_sec, self._timespec.tv_nsec = secs, int((timeout - secs) * 1e9)
            self._timeout = timeout
        self._seen.value = seen
        self._call(  # type: ignore[operator]
            self._number, self._addr, self._wait_op, self._seen,
            ctypes.byref(self._timespec), None, self._zero,
        )  # fmt: skip

    def wake_all(self) -> None:
        if _FUTEX is None:
            return
        self._call(  # type: ignore[operator]
            self._number, self._addr, self._wake_op, self._all, None, None, self._zero
        )

    def close(self) -> None:
        """Drop the reference into the mapping (the mapping cannot close while it lives)."""
        with contextlib.suppress(AttributeError):
            del self._word
