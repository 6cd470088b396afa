"""``status`` of a log other processes append to and confirm: its figures agree.

Each figure is read at a different moment. Read in the wrong order (the next LSN before
the high water mark, the marks after the next LSN), a busy log showed a high water mark
past its next LSN, a low water mark past the high one, or ``pending`` below zero."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from walstore import Options, Status, Wal
from walstore.inspect import snapshot

APPENDER = """
import sys, time
from walstore import Options, Wal
wal = Wal.open(sys.argv[1], Options(segment_bytes=64 * 1024, min_free_bytes=0))
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    wal.append_batch([b"x" * 100] * 4)
"""

CONFIRMER = """
import sys, time
from walstore import Options, Wal
wal = Wal.open(sys.argv[1], Options(segment_bytes=64 * 1024, min_free_bytes=0))
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    wal.set_low_water_mark(wal.high_water_mark())
"""


def _disagreements(st: Status) -> list[str]:
    found = []
    if not st.first_lsn <= st.low_water_mark:
        found.append(f"first_lsn {st.first_lsn} > low_water_mark {st.low_water_mark}")
    if not st.low_water_mark <= st.high_water_mark:
        found.append(f"low_water_mark {st.low_water_mark} > high {st.high_water_mark}")
    if not st.high_water_mark <= st.next_lsn:
        found.append(f"high_water_mark {st.high_water_mark} > next_lsn {st.next_lsn}")
    if st.pending < 0:
        found.append(f"pending {st.pending}")
    return found


def test_status_figures_agree_while_others_append_and_confirm(tmp_path: Path) -> None:
    directory = tmp_path / "wal"
    opts = Options(segment_bytes=64 * 1024, min_free_bytes=0)
    Wal.open(directory, opts).close()
    seconds = 6.0
    procs = [
        subprocess.Popen([sys.executable, "-c", APPENDER, str(directory), str(seconds)])
        for _ in range(3)
    ]
    procs.append(subprocess.Popen([sys.executable, "-c", CONFIRMER, str(directory), str(seconds)]))
    bad: list[str] = []
    reads = 0
    try:
        with Wal.open(directory, opts) as wal:
            deadline = time.monotonic() + 30
            while wal.low_water_mark() < 200 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert wal.low_water_mark() >= 200, "the appenders and the confirmer did not start"
            end = time.monotonic() + seconds - 1.5
            while time.monotonic() < end and len(bad) < 20:
                for st in (wal.status(), snapshot(str(directory))):
                    reads += 1
                    bad += [f"{type(st).__name__}: {d}" for d in _disagreements(st)]
    finally:
        for proc in procs:
            proc.wait(timeout=60)
    assert reads > 200
    assert bad == [], f"{len(bad)} disagreements in {reads} reads, e.g. {bad[:4]}"
