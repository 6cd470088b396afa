"""A producer process for the fault suite: records purchases with
``tasks.checkout.record_purchase`` at a steady rate until SIGTERM (or its time or count
bound), like a web worker taking checkouts.

    python tests/fault_producer.py JOURNAL PREFIX RATE [MAX_SECONDS] [MAX_COUNT]

Its journal (the format of ``tools.loadgen``, with timings added) gets ``try ID`` before
each append and ``ok ID LSN AT LATENCY`` once ``record_purchase`` returned (AT: the
monotonic clock at return, comparable between processes on one host; LATENCY: seconds
the append took), or ``err ID REASON`` if it raised. Each line is one write on an
O_APPEND file, so a kill -9 leaves whole lines and at most one ``try`` without answer.
RATE 0 means as fast as it can. A late producer does not burst to catch up: every
append is paced from the previous one, so latencies are not hidden by a backlog.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from tasks.checkout import record_purchase
from tools.loadgen import purchase


def main() -> int:
    journal, prefix, rate = sys.argv[1], sys.argv[2], float(sys.argv[3])
    max_seconds = float(sys.argv[4]) if len(sys.argv) > 4 else 300.0
    max_count = int(sys.argv[5]) if len(sys.argv) > 5 else 1_000_000
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: stopping.append(signum))
    fd = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    gap = 1.0 / rate if rate > 0 else 0.0
    deadline = time.monotonic() + max_seconds
    failures = 0
    for n in range(max_count):
        if stopping or time.monotonic() > deadline:
            break
        pid = f"{prefix}-{n}"
        os.write(fd, f"try {pid}\n".encode())
        started = time.monotonic()
        try:
            receipt = record_purchase(purchase(pid, n))
        except Exception as exc:  # the suite asserts there is none; say what it was
            failures += 1
            os.write(fd, f"err {pid} {type(exc).__name__}:{exc}\n".encode())
            time.sleep(max(gap, 0.1))
            continue
        done = time.monotonic()
        os.write(fd, f"ok {pid} {receipt.lsn} {done:.6f} {done - started:.6f}\n".encode())
        pause = started + gap - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    os.close(fd)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
