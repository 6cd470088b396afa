"""bench.wal's read cases: a log of any size (the review of 2026-12-01 found one under
1,000 records built empty, and the run failed dividing by zero after every case)."""

from __future__ import annotations

from pathlib import Path

from bench.wal import bare_loop, build_log
from walstore import Wal


def test_the_bare_loop_counts_every_record_of_a_log_of_any_size(tmp_path: Path) -> None:
    for records in (999, 2500):
        where = str(tmp_path / str(records))
        build_log(where, records)
        with Wal.open(where) as wal:
            assert sum(1 for _ in wal.iter_from(wal.first_lsn())) == records
        assert bare_loop(where) == records
        assert bare_loop(where, chunk=1000) == records  # records cut by the chunks
