"""The pump's place in the log: the next LSN it has not taken, and a reader there.

The position moves only past records the pump took into its care (``admit`` returned):
if a read fails halfway (a checksum mismatch, EIO) or taking a record fails (its dead
letter could not be written), the reader is dropped and a new one starts again at that
position, one record at a time until a read succeeds, after a pause that grows with
each failure. Whatever a reader does, no record is skipped: a jump in LSNs is accepted
only if a fresh reader confirms that the LSNs in between hold no data (records marked
lost by ``walstore repair``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

from walstore import Reader, Wal

from .pumpstats import PumpStats
from .window import PumpConfig

logger = logging.getLogger("walrelay.pump")

LOG_EVERY = 30.0  # seconds between two logs of the same read error


class LogCursor:
    def __init__(self, wal: Wal, start: int, config: PumpConfig, stats: PumpStats) -> None:
        self.wal = wal
        self.next_lsn = start  # every record below is taken; none at or above
        self._config = config
        self._stats = stats
        self._reader: Reader | None = None
        self._limit = config.read_batch  # records per read: 1 after a failure, then doubling
        self._failures = 0
        self._retry_at = float("-inf")
        self._logged = ("", float("-inf"))

    def admit(self, now: float, max_records: int, admit: Callable[[int, bytes], None]) -> int:
        """Read up to ``max_records`` and pass each to ``admit`` in LSN order; returns
        how many were taken."""
        if now < self._retry_at:
            return 0
        try:
            if self._reader is None:
                self._reader = self.wal.reader(self.next_lsn)
            records = self._reader.read(min(max_records, self._limit))
        except Exception as exc:  # CorruptLogError, EIO, ...: nothing past next_lsn is trusted
            self._failed(now, f"cannot read the log at LSN {self.next_lsn}: {exc}")
            return 0
        taken = 0
        for lsn, payload in records:
            if lsn < self.next_lsn:
                continue
            if lsn > self.next_lsn and not self._holds_no_data(lsn):
                self._drop_reader()
                break
            try:
                admit(lsn, payload)
            except Exception as exc:
                self._failed(now, f"cannot take the record at LSN {lsn}: {exc!r}")
                break
            self.next_lsn = lsn + 1
            taken += 1
        else:
            if records:
                self._failures = 0
                self._limit = min(self._config.read_batch, self._limit * 2)
        return taken

    def _failed(self, now: float, message: str) -> None:
        self._stats.read_errors += 1
        self._failures += 1
        self._limit = 1  # take the records before the bad spot one by one
        delay = min(0.05 * 2 ** min(self._failures, 20), self._config.max_reconnect_delay)
        self._retry_at = now + delay
        self._drop_reader()
        last, at = self._logged
        if message != last or now - at >= LOG_EVERY:
            logger.error("pump: %s; retrying (nothing past it is skipped)", message)
            self._logged = (message, now)

    def _holds_no_data(self, lsn: int) -> bool:
        try:
            fresh = self.wal.reader(self.next_lsn)
            try:
                got = fresh.read(1)
            finally:
                fresh.close()
        except Exception:
            return False
        if got and got[0][0] == lsn:
            logger.warning("pump: LSNs %d-%d hold no record (marked lost by a repair)",
                           self.next_lsn, lsn - 1)  # fmt: skip
            return True
        return False

    def _drop_reader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            with contextlib.suppress(OSError):
                reader.close()
