"""A process killed while it prunes, between deleting segments and lowering the shared
byte count: the count stayed too high for as long as the log was open, and appends
failed with LogFullError (WAL_MAX_BYTES) on a log far below its cap."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from walstore import Options, Wal

OPTS = Options(segment_bytes=8192, max_bytes=4 * 8192, min_free_bytes=0)

DIES_MID_PRUNE = """
import os, sys
from walstore import Options, Wal
from walstore.fs import OsFs
class DiesAfterAnUnlink(OsFs):
    def unlink(self, path):
        super().unlink(path)
        os._exit(9)  # killed: the segment is gone, the shared count not yet lowered
wal = Wal.open(sys.argv[1], Options(segment_bytes=8192, max_bytes=4 * 8192,
               min_free_bytes=0, fs=DiesAfterAnUnlink()))
wal.set_low_water_mark(wal.high_water_mark())
"""


def _on_disk(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.seg"))


def test_a_pruner_killed_midway_leaves_no_false_log_full(tmp_path: Path) -> None:
    directory = tmp_path / "wal"
    with Wal.open(directory, OPTS) as wal:  # keeps the shared state alive
        for _round in range(6):
            for _ in range(9):
                wal.append(b"r" * 1000)  # about a segment's worth: rolls over
            child = subprocess.run([sys.executable, "-c", DIES_MID_PRUNE, str(directory)])
            assert child.returncode == 9
            assert _on_disk(directory) < 3 * 8192
        wal.append(b"r" * 1000)  # raised LogFullError: the count said the cap was reached
        for _ in range(9):
            wal.append(b"r" * 1000)
        wal.set_low_water_mark(wal.high_water_mark())
        assert wal.status().bytes <= _on_disk(directory) + 8192


DIES_AFTER_ITS_UNLINKS = """
import os, sys
from walstore import Options, Wal
from walstore.fs import OsFs
class DiesAtTheDirectorySync(OsFs):
    unlinked = False
    def unlink(self, path):
        super().unlink(path)
        self.unlinked = True
    def fsync_dir(self, path):
        if self.unlinked:
            os._exit(9)  # every doomed segment deleted, the count not yet recounted
        super().fsync_dir(path)
wal = Wal.open(sys.argv[1], Options(segment_bytes=8192, min_free_bytes=0,
               fs=DiesAtTheDirectorySync()))
wal.set_low_water_mark(wal.high_water_mark())
"""


def test_the_next_prune_recounts_even_with_nothing_left_to_delete(tmp_path: Path) -> None:
    """The pruner died after deleting every doomed segment: the next prune found none to
    delete and left the count too high (status' bytes) for as long as the log was open."""
    directory = tmp_path / "wal"
    with Wal.open(directory, Options(segment_bytes=8192, min_free_bytes=0)) as wal:
        for _ in range(40):
            wal.append(b"r" * 1000)
        child = subprocess.run([sys.executable, "-c", DIES_AFTER_ITS_UNLINKS, str(directory)])
        assert child.returncode == 9
        wal.append(b"r" * 1000)  # (the dead pruner's mark was persisted: move past it)
        assert wal.set_low_water_mark(wal.high_water_mark()) == 0  # nothing left to delete
        active = max(directory.glob("*.seg"))
        sealed = _on_disk(directory) - active.stat().st_size
        status = wal.status()
        assert status.bytes - sealed < 8192, (status.bytes, sealed)
