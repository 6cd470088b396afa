"""walstore: a crash-safe, segmented, multi-process write-ahead log.

Pure library: knows files and bytes, nothing of Celery. See ``walstore.format`` for the
on-disk format and ``walstore.log.Wal`` for the API::

    with Wal.open("var/wal") as wal:
        lsn = wal.append(b"...")            # durable when it returns
        for lsn, payload in wal.iter_from(wal.low_water_mark()):
            ...
        wal.set_low_water_mark(lsn + 1)     # checkpoint + prune
"""

from .errors import (
    CorruptLogError,
    LogAttachError,
    LogBusyError,
    LogClosedError,
    LogFullError,
    LogPoisonedError,
    LsnOutOfRangeError,
    RecordTooLargeError,
    WalError,
)
from .log import Status, Wal
from .options import Options, SyncPolicy
from .reader import Reader
from .scan import Record

__all__ = [
    "CorruptLogError",
    "LogAttachError",
    "LogBusyError",
    "LogClosedError",
    "LogFullError",
    "LogPoisonedError",
    "LsnOutOfRangeError",
    "Options",
    "Reader",
    "Record",
    "RecordTooLargeError",
    "Status",
    "SyncPolicy",
    "Wal",
    "WalError",
]
