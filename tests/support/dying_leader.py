"""A producer SIGKILLed between writing the spare copy of the shared write region and
selecting it (an ordinary crash: nothing in ``shm`` is damaged), at the first update of
the kind ``argv[2]`` names: ``batch`` (the state that publishes a batch of slots) or
``append`` (the intent of an append while producers wait in slots).

    python -m tests.support.dying_leader DIR batch|append
"""

from __future__ import annotations

import os
import signal
import sys
import time

from walstore import Wal
from walstore import shm as shared

_SELECTOR = shared._SELECTOR_OFF


def main() -> None:
    directory, mode = sys.argv[1], sys.argv[2]
    real = shared.SharedState.set_write
    calls = 0

    def dies_before_the_flip(self: shared.SharedState, state: shared.WriteState) -> None:
        nonlocal calls
        calls += 1
        try:
            current: shared.WriteState | None = self.write_state()
        except shared.TornStateError:
            current = None
        if mode == "batch":
            hit = (current is not None and state.intent == shared.INTENT_NONE
                   and state.last_batch != current.last_batch)  # fmt: skip
        else:
            hit = state.intent == shared.INTENT_APPEND and calls > 50 and self.ready_slots() > 0
        if hit:
            selector = self._mm[_SELECTOR]
            real(self, state)
            self._mm[_SELECTOR] = selector  # the switch never happened
            os.kill(os.getpid(), signal.SIGKILL)
        real(self, state)

    shared.SharedState.set_write = dies_before_the_flip  # type: ignore[method-assign]
    wal = Wal.open(directory)
    end = time.monotonic() + 20
    while time.monotonic() < end:
        wal.append(b"leader %d" % calls)
    sys.exit(3)  # never got to die


if __name__ == "__main__":
    main()
