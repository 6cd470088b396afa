"""A worker connected to the broker but no longer consuming (celery#8030, #8082, #10205)
is detected and healed by walrelay.worker.consumer.

Celery 5.7 / kombu 5.7 resume consuming after every Redis restart and freeze this suite
tries (test_faults.py), so the stuck state is made on purpose: fault_app drops the BRPOP
socket from the worker's event loop while kombu still believes it is polled, the way the
historical bugs lost it. Worker A runs Celery's plain consumer, worker B ours; both are
broken the same way, then purchases arrive.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.faultkit import Pipeline, Producers, paused, report
from tests.support.stack import wait_until

pytestmark = [pytest.mark.faults]


@pytest.fixture
def pipe(tmp_path: Path) -> Iterator[Pipeline]:
    pipeline = Pipeline(tmp_path)
    # The message a stuck BRPOP popped is lost with it; the pump re-sends it after this.
    pipeline.stack.overrides = {**pipeline.stack.overrides, "PUMP_ACK_TIMEOUT": "5"}
    try:
        pipeline.broker.start()
        yield pipeline
    finally:
        pipeline.stop_all()


@pytest.mark.timeout(180)
def test_a_stuck_consumer_is_detected_and_healed(pipe: Pipeline) -> None:
    pipe.start_workers(1, FAULT_WATCHDOG="0")
    pipe.start_workers(1)
    plain, ours = pipe.workers
    pipe.start_pump()
    warm = Producers(pipe.stack, "warm-", count=1, rate=0, max_count=4).start()
    assert warm.wait(60) == [0]
    pipe.check("warm-", warm.journal())

    for worker in (plain, ours):
        (pipe.marks / f"break-{worker.pid}").touch()
    for worker in (plain, ours):
        wait_until("consumer broken", (pipe.marks / f"broken-{worker.pid}").exists, 30, 0.1)
    received = pipe.stack.log_of(plain).count(" received")
    broken_at = time.monotonic()

    stuck = Producers(pipe.stack, "stuck-", count=1, rate=0, max_count=20).start()
    assert stuck.wait(60) == [0]
    queued_at = time.monotonic()
    wait_until("the watchdog's verdict", lambda: "consumer stalled" in pipe.stack.log_of(ours),
               30, 0.1)  # fmt: skip
    healed_after = time.monotonic() - queued_at
    wait_until("worker B consuming again", lambda: " ready." in pipe.stack.log_of(ours)
               and pipe.stack.log_of(ours).count("Connected to") >= 2, 30, 0.1)  # fmt: skip
    result = pipe.check("stuck-", stuck.journal())

    # Worker A, same fault, no watchdog: still connected, took nothing. Hold B back and
    # give A work for longer than kombu's own BRPOP health check (26 s by default).
    with paused([ours.pid]):
        late = Producers(pipe.stack, "late-", count=1, rate=0, max_count=10).start()
        assert late.wait(60) == [0]
        time.sleep(30)
        waiting = pipe.queued()
    log = pipe.stack.log_of(plain)
    assert waiting >= 19, waiting  # paused B's pending BRPOP may hold one of the 20
    assert log.count(" received") == received, "the plain consumer was not stuck"
    assert "Connection to broker lost" not in log and "stale connection" not in log
    assert plain.poll() is None
    assert healed_after < 20
    pipe.check("late-", late.journal())  # B, resumed, takes them
    report("stuck-consumer", healed_after=f"{healed_after:.1f}s",
           plain_consumer_stuck_for=f"{time.monotonic() - broken_at:.0f}s",
           duplicates=sum(result.duplicates.values()))  # fmt: skip
