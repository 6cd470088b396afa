"""Attack: a task routed to a queue no worker consumes is neither dead-lettered nor
bounded; the pump re-sends it forever, piling copies into that queue, and the low water
mark stays behind it (so no segment after it is ever pruned).

DESIGN.md, Guarantees: "A poison record (undecodable, unknown task, unpublishable, a
queue no worker consumes) is dead-lettered within bounded attempts and time, with its
reason, and never stops or floods the delivery of the others."
Found by the review before the pump's stall timeout: after 40 s no dead letter, ~17 copies
in the queue, the low water mark stuck at the record. Now dead-lettered after
PUMP_STALL_TIMEOUT with at most one copy per PUMP_MAX_ACK_TIMEOUT meanwhile."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.support.stack import CELERY, ROOT, Stack, wait_until
from tests.system.review.attack_app import note
from tests.system.review.test_pump_schedule import APP, doc, relay_of, start

pytestmark = pytest.mark.timeout(180)
# A queue that never moves is given up after PUMP_STALL_TIMEOUT (default 2 h, so that
# workers down for a while are ridden out); meanwhile one copy per PUMP_MAX_ACK_TIMEOUT.
FAST = {"PUMP_ACK_TIMEOUT": "1", "PUMP_MAX_ACK_TIMEOUT": "2", "PUMP_MAX_ATTEMPTS": "2",
        "PUMP_RETRY_DELAY": "0.2", "PUMP_STALL_TIMEOUT": "10"}  # fmt: skip
MAX_COPIES = 10 // 2 + 2  # stall timeout / max ack timeout, the first send, one in flight


def dead_letters(stack: Stack) -> list[dict[str, object]]:
    import subprocess

    argv = [CELERY, "-A", APP, "deadletters", "list", "--json"]
    res = subprocess.run(argv, cwd=str(ROOT), env=stack.env(FAST), capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stderr
    text = res.stdout.strip()
    if not text:
        return []
    try:
        data = json.loads(text)
        return data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_a_queue_no_worker_consumes_is_dead_lettered_in_bounded_time(
    stack: Stack, tmp_path: Path
) -> None:
    out = start(stack, tmp_path, 1, **FAST)
    relay = relay_of(stack)
    try:
        lost = relay.send(note.s("nobody-listens").set(queue="nowhere"))
        fine = relay.send(note.s("fine"))
    finally:
        relay.close()
    wait_until("the other record ran", lambda: doc(out, fine.task_ids[0]), 60, 0.2)

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not dead_letters(stack):
        time.sleep(2)
    copies = stack.redis.client().llen("nowhere")
    status = stack.wal_status()
    assert dead_letters(stack), (
        f"after 60 s the record {lost.lsn} routed to 'nowhere' is not dead-lettered; "
        f"{copies} copies queued there; low water mark {status.low_water_mark}"
    )
    assert copies <= MAX_COPIES, f"{copies} copies flooded 'nowhere'"
    wait_until("the low water mark passes it", lambda: stack.wal_status().low_water_mark == 2, 30)
