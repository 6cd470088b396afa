"""A process for the attach stress test (tests/test_wal_attach_stress.py).

``wal_attacher.py DIR LOGFILE IDENT SECONDS [repair]``: until SECONDS have passed, open
the log, append a few records, close it, pause; or (``repair``) run ``walstore repair``
again and again. Writes one line per event to LOGFILE, each *after* the event:

    ack LSN TAG          an append returned (the record is acknowledged)
    refused ERROR TEXT   open or repair refused, with one of walstore's explicit errors
    repaired TEXT        a repair ran (TEXT: what it rewrote, what it lost)
    error TEXT           anything else (the test fails on it)
"""

from __future__ import annotations

import random
import sys
import time

from walstore import LogAttachError, LogBusyError, Options, Wal
from walstore.repair import repair

REFUSALS = (LogBusyError, LogAttachError)


def appender(directory: str, log: object, ident: str, stop: float) -> None:
    rng = random.Random(ident)
    opts = Options(segment_bytes=16384, min_free_bytes=0)
    n = 0
    while time.monotonic() < stop:
        try:
            wal = Wal.open(directory, opts)
        except REFUSALS as exc:
            print(f"refused {type(exc).__name__} {exc}", file=log)  # type: ignore[call-overload]
            time.sleep(rng.uniform(0.005, 0.03))
            continue
        try:
            for _ in range(rng.randint(1, 12)):
                tag = f"{ident}:{n}"
                n += 1
                lsn = wal.append(f"{tag}|".encode().ljust(rng.choice((30, 200, 900)), b"x"))
                print(f"ack {lsn} {tag}", file=log)  # type: ignore[call-overload]
        finally:
            wal.close()
        time.sleep(rng.uniform(0.0, 0.06))


def repairer(directory: str, log: object, stop: float) -> None:
    while time.monotonic() < stop:
        try:
            report = repair(directory)
        except REFUSALS as exc:
            print(f"refused {type(exc).__name__} {exc}", file=log)  # type: ignore[call-overload]
        else:
            print(f"repaired {report.rewritten} lost={report.lost}", file=log)  # type: ignore[call-overload]
        time.sleep(0.003)


def main() -> None:
    directory, log_path, ident, seconds = sys.argv[1:5]
    stop = time.monotonic() + float(seconds)
    with open(log_path, "a", buffering=1) as log:
        try:
            if sys.argv[5:] == ["repair"]:
                repairer(directory, log, stop)
            else:
                appender(directory, log, ident, stop)
        except BaseException as exc:
            print(f"error {type(exc).__name__}: {exc}", file=log)
            raise


if __name__ == "__main__":
    main()
