"""The marks other processes read while appenders write them: never seen going back.

``struct.pack_into`` zeroes its bytes before it writes them, so a field another process
reads without a lock, written that way, reads 0 for a moment: the high water mark went
back to 0, and ``reader(lsn)`` and ``set_low_water_mark(lsn)`` refused an LSN below the
mark ("past the high water mark")."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from walstore import LsnOutOfRangeError, Options, Wal

APPENDER = """
import sys, time
from walstore import Wal
wal = Wal.open(sys.argv[1])
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    wal.append(b"x" * 100)
"""


def test_the_high_water_mark_never_reads_lower_while_others_append(tmp_path: Path) -> None:
    directory = tmp_path / "wal"
    Wal.open(directory).close()
    seconds = 6.0
    appenders = [
        subprocess.Popen([sys.executable, "-c", APPENDER, str(directory), str(seconds)])
        for _ in range(3)
    ]
    went_back: list[tuple[int, int]] = []
    refused: list[str] = []
    reads = 0
    try:
        with Wal.open(directory, Options(min_free_bytes=0)) as wal:
            deadline = time.monotonic() + 30
            while wal.high_water_mark() < 200 and time.monotonic() < deadline:
                time.sleep(0.01)
            last = wal.high_water_mark()
            assert last >= 200, "the appenders did not start"
            end = time.monotonic() + seconds - 1.5
            while time.monotonic() < end and len(went_back) + len(refused) < 20:
                for _ in range(200):
                    mark = wal.high_water_mark()
                    reads += 1
                    if mark < last:
                        went_back.append((last, mark))
                    last = max(last, mark)
                try:
                    wal.reader(100).close()
                except LsnOutOfRangeError as exc:
                    refused.append(str(exc))
    finally:
        for proc in appenders:
            proc.wait(timeout=60)
    assert reads > 10_000
    assert went_back == [], f"the mark went back {len(went_back)} times, e.g. {went_back[:3]}"
    assert refused == [], f"reader(100) refused {len(refused)} times: {refused[:2]}"
