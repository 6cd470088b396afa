"""Attack: a task routed to a queue whose name holds a lone UTF-16 surrogate.

``relay.send`` accepts it (only args, kwargs and headers are checked for JSON text) and
appends the record. README, "The pump": "A poison record is dead-lettered, with its
reason, and never stops the others"; a message the broker refuses is "re-tried,
dead-lettered after ``PUMP_MAX_ATTEMPTS``" (DESIGN.md: "dead-lettered within bounded
attempts and time"). Observed: the good records flow, but the pump re-tries the poison
message every ``PUMP_RETRY_DELAY`` (no doubling) for ever ("the broker refused task 0 of
entry 0: UnicodeEncodeError"), it is never dead-lettered and the low water mark stays
at it, so no segment after it can ever be pruned.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.stack import Stack, wait_until
from tests.system.review.attack_app import note
from tests.system.review.test_poison_queue import FAST, dead_letters
from tests.system.review.test_pump_schedule import doc, relay_of, start

pytestmark = pytest.mark.timeout(180)


def refusals(tmp_path: Path) -> int:
    return sum(p.read_text(errors="replace").count("the broker refused task")
               for p in tmp_path.rglob("*pump*.log"))  # fmt: skip


def test_a_surrogate_in_the_queue_name_is_dead_lettered(stack: Stack, tmp_path: Path) -> None:
    out = start(stack, tmp_path, 1, **FAST)  # PUMP_MAX_ATTEMPTS=2, PUMP_RETRY_DELAY=0.2
    relay = relay_of(stack)
    try:
        try:
            relay.send(note.s("bad").set(queue="q\ud800"))
        except ValueError:
            return  # refused at send, nothing appended: the contract holds
        fine = relay.send(note.s("fine"))
    finally:
        relay.close()
    wait_until("the good record ran", lambda: doc(out, fine.task_ids[0]), 60, 0.2)
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline and not dead_letters(stack):
        time.sleep(2)
    assert dead_letters(stack), (
        f"a queue name with a lone surrogate: not dead-lettered 40 s after the good record "
        f"ran (PUMP_MAX_ATTEMPTS=2); the pump logged {refusals(tmp_path)} refusals of it; "
        f"low water mark {stack.wal_status().low_water_mark} (the poison record is LSN 0)"
    )
