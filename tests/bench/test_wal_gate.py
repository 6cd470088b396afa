"""bench.wal's start barrier: a producer slow to get ready still gets the whole window.

The first version gave every producer a guessed head start; sixteen children importing
the example app took longer than that, so purchase-16 counted appends over a window part
of its producers had not yet reached.
"""

from __future__ import annotations

import time
from typing import Any

from bench.wal import Gate, _producers

SLOW_READY_S = 1.5  # longer than the old head start (0.5 s + 30 ms a producer)


def _on_time(where: str, proc: int, gate: Gate, out: Any) -> None:
    if proc == 0:
        time.sleep(SLOW_READY_S)  # as slow as an import of the example app by sixteen
    start, stop = gate.wait()
    began = time.time()
    # One "append" if this producer's loop began with the window, none if it was late.
    out.put((int(began - start < 0.1 and stop - start > 0), 0.0))


def test_every_producer_starts_with_the_window() -> None:
    seconds = 0.2
    result = _producers(_on_time, ["a", "b", "c"], seconds)
    assert round(result["rate"] * seconds) == 3
