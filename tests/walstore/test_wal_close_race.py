"""``close`` while other threads of the process append, sync, confirm or ask for status.

close used to let go of the segment descriptors and the shared mapping under calls still
running: they failed with whatever broke first (``ValueError: mmap closed``, a bad file
descriptor), and a descriptor closed under a leader could be reused by an unrelated file
before its pwrite. close now waits for the calls under way; a call made after it gets
LogClosedError, and every append that returned an LSN is in the log."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from walstore import LogClosedError, Options, Wal


def test_close_waits_for_the_calls_under_way(tmp_path: Path) -> None:
    directory = tmp_path / "wal"
    opts = Options(segment_bytes=16384, min_free_bytes=0)
    wrong: list[BaseException] = []
    acked: set[int] = set()
    for _round in range(25):
        wal = Wal.open(directory, opts)
        go = threading.Event()

        def appender(wal: Wal = wal, go: threading.Event = go) -> None:
            go.wait()
            try:
                for _ in range(10_000):
                    acked.add(wal.append(b"r" * 200))
                    acked.update(wal.append_batch([b"a" * 100, b"b" * 100]))
            except LogClosedError:
                pass
            except BaseException as exc:  # collected, asserted on below
                wrong.append(exc)

        def other(call: Callable[[], object], go: threading.Event = go) -> None:
            go.wait()
            try:
                for _ in range(100_000):
                    call()
            except LogClosedError:
                pass
            except BaseException as exc:  # collected, asserted on below
                wrong.append(exc)

        threads = [threading.Thread(target=appender) for _ in range(3)]
        threads += [
            threading.Thread(target=other, args=(call,))
            for call in (
                wal.sync,
                wal.status,
                wal.high_water_mark,
                lambda wal=wal: wal.set_low_water_mark(wal.high_water_mark()),
            )
        ]
        for t in threads:
            t.start()
        go.set()
        time.sleep(0.01 + _round * 0.002)
        wal.close()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        assert wrong == [], f"{len(wrong)} calls failed otherwise than closed: {wrong[:3]!r}"
    with Wal.open(directory, opts) as wal:
        lwm = wal.low_water_mark()
        present = {lsn for lsn, _ in wal.iter_from(lwm)}
    missing = {lsn for lsn in acked if lsn >= lwm} - present
    assert acked and not missing, f"{len(missing)} acknowledged appends are not in the log"
