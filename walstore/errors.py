"""The one error tree of walstore. Every message says what to do next."""

from __future__ import annotations


class WalError(Exception):
    """Base of every error walstore raises on purpose."""


class CorruptLogError(WalError):
    """A record or segment failed verification somewhere other than a torn tail.

    Raised at open (or while reading) with the segment, the byte offset and the reason.
    The log refuses to open rather than silently skip data: run ``walstore verify DIR``
    to see the damage and ``walstore repair DIR`` (offline) to get past it.
    """

    def __init__(self, segment: str, offset: int, reason: str) -> None:
        self.segment = segment
        self.offset = offset
        self.reason = reason
        super().__init__(
            f"corrupt log: segment {segment} offset {offset}: {reason}; "
            "run 'walstore verify' to inspect and 'walstore repair' (offline) to recover"
        )


class LogClosedError(WalError):
    """The log object was closed; open it again."""


class LogPoisonedError(WalError):
    """An fsync (or write) failed: data that was reported written may not be on disk.

    After such an error nothing more is acknowledged (fsyncgate: a later fsync may report
    success for pages the kernel already dropped). Fix the disk, stop every process that
    has the log open, and open it again: recovery then reads back what really is on disk.
    """


class LogFullError(WalError):
    """Appending would pass the configured byte cap, or the disk is (nearly) full.

    Nothing was appended. Let the pump confirm and prune the backlog, raise the cap, or
    free disk space; then append again.
    """


class RecordTooLargeError(WalError, ValueError):
    """A payload is larger than ``Options.max_record_bytes``; nothing was appended."""


class LogBusyError(WalError):
    """An exclusive holder (a repair, or another reader that must be alone) has the log."""


class LogAttachError(WalError):
    """Open found the files the processes using the log share (``shm``, the lock files)
    removed or replaced under them, or a shared state that does not match the segments.

    Attaching to other files than theirs could hand out an LSN twice, so open refuses.
    Those processes keep working; stop them all (or wait until they close the log), then
    open it again: the first process to open it rebuilds the shared files.
    """


class LsnOutOfRangeError(WalError, ValueError):
    """An LSN below the first one still in the log (pruned) or past the high water mark."""
