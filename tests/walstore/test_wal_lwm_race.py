"""Two processes moving the low water mark of one log at once.

Each read the checkpoint, compared, wrote its own mark and pruned, under a lock of its
own process only: one could write a mark below the other's after the other had pruned
up to its own, so the mark went back, segments at and above it were gone, and the log
refused to open ("segments before it are missing"). The pump is the one process that
should confirm a log, but nothing stopped a second one (or a script) from doing it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from walstore import Options, Wal
from walstore.fs import OsFs
from walstore.recovery import read_checkpoint

CONFIRMER = """
import sys, time
from walstore import Options, Wal
wal = Wal.open(sys.argv[1], Options(segment_bytes=8192, min_free_bytes=0))
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    for _ in range(3):
        wal.append(b"z" * 1000)
    wal.set_low_water_mark(wal.high_water_mark())
wal.close()
"""


def test_the_low_water_mark_never_goes_back_with_two_confirmers(tmp_path: Path) -> None:
    directory = tmp_path / "wal"
    opts = Options(segment_bytes=8192, min_free_bytes=0)
    Wal.open(directory, opts).close()
    seconds = 6.0
    procs = [
        subprocess.Popen([sys.executable, "-c", CONFIRMER, str(directory), str(seconds)])
        for _ in range(2)
    ]
    back: list[tuple[int, int]] = []
    last = reads = 0
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end and len(back) < 10:
            mark = read_checkpoint(OsFs(), str(directory))
            reads += 1
            if mark < last:
                back.append((last, mark))
            last = max(last, mark)
            time.sleep(0.0005)
    finally:
        codes = [proc.wait(timeout=60) for proc in procs]
    assert reads > 100 and last > 100
    assert back == [], f"the low water mark went back {len(back)} times, e.g. {back[:3]}"
    assert codes == [0, 0]
    with Wal.open(directory, opts) as wal:
        assert wal.first_lsn() <= wal.low_water_mark() <= wal.high_water_mark()
