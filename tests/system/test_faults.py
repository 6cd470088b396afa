"""Crash the broker (issue 4): a private redis-server without persistence, two real
workers, the real pump and producer processes appending throughout. Each case ends with
``Pipeline.check``: the backlog drains, every acknowledged purchase has exactly one
effect at both targets, none is lost, no effect is unknown, ``walstore status`` pending 0.

One pipeline serves the module (cases run in order; each starts by restarting whatever an
earlier one left dead). ``make faults`` runs this suite alone (``pytest -m faults``).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from tests.support.faultkit import (
    RECOVERY_BOUND,
    Pipeline,
    Producers,
    latency_summary,
    one_case,
    paused,
    report,
    running_pipeline,
)
from tests.support.stack import wait_until

pytestmark = [pytest.mark.faults]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    with running_pipeline(tmp_path_factory.mktemp("faults-broker")) as pipeline:
        yield pipeline


@pytest.fixture(autouse=True)
def case(pipe: Pipeline) -> Iterator[None]:
    with one_case(pipe):
        yield


def sessions(pipe: Pipeline) -> int:
    assert pipe.pump is not None
    return pipe.stack.log_of(pipe.pump).count("new broker session")


def flowing(pipe: Pipeline, prefix: str) -> None:
    """Until some purchases of ``prefix`` reached both targets (the stream is running)."""

    def some() -> bool:
        snap = pipe.stack.ledger()
        return all(any(p.startswith(prefix) for p in snap[t]) for t in ("warehouse", "finance"))

    wait_until(f"purchases {prefix}* flowing", some, 30, 0.2)


@pytest.mark.timeout(180)
def test_redis_killed_mid_stream_and_restarted_empty_twice(pipe: Pipeline) -> None:
    producers = Producers(pipe.stack, "kill2-", count=3, rate=20).start()
    flowing(pipe, "kill2-")
    before = sessions(pipe)
    recoveries, lost = [], []
    for _ in range(2):
        time.sleep(1.0)
        with paused([w.pid for w in pipe.workers]):  # slow workers: a queue builds up
            time.sleep(1.0)
            lost.append(pipe.queued())
            assert lost[-1] > 0
            pipe.redis.kill()  # kill -9: every queued task and ack is gone
        time.sleep(3)
        pipe.redis.start()  # same port, empty
        recoveries.append(pipe.recovery(time.monotonic()))
    assert producers.stop() == [0, 0, 0]
    journal = producers.journal()
    assert journal.errors == []
    result = pipe.check("kill2-", journal)
    pipe.all_workers_consuming()
    assert sessions(pipe) == before + 2  # each restart seen as a new session: all re-sent
    for rec in recoveries:
        assert rec.started < RECOVERY_BOUND, rec
    report("redis-kill-twice", purchases=len(journal.acked), tasks_lost=lost, recovery=recoveries,
           duplicates=sum(result.duplicates.values()))  # fmt: skip


@pytest.mark.timeout(180)
def test_redis_down_when_the_pump_and_workers_start(pipe: Pipeline) -> None:
    for proc in [*pipe.workers, pipe.pump]:
        assert proc is not None
        pipe.stack.stop(proc)
    pipe.workers, pipe.pump = [], None
    pipe.redis.kill()
    producers = Producers(pipe.stack, "cold-", count=3, rate=20).start()
    pipe.start_workers(2, wait=False)
    pipe.start_pump()  # it starts, with nothing to talk to
    for worker in pipe.workers:
        pipe.wait_log(worker, "Cannot connect to redis")  # up, retrying
    time.sleep(3)
    appended_while_down = len(producers.journal().acked)
    assert appended_while_down > 0
    pipe.redis.start()
    recovery = pipe.recovery(time.monotonic())
    for worker in pipe.workers:
        pipe.wait_log(worker, " ready.")
    assert producers.stop() == [0, 0, 0]
    journal = producers.journal()
    assert journal.errors == []
    result = pipe.check("cold-", journal)
    pipe.all_workers_consuming()
    assert recovery.started < RECOVERY_BOUND, recovery
    report("redis-down-at-start", purchases=len(journal.acked), recovery=recovery,
           duplicates=sum(result.duplicates.values()))  # fmt: skip


@pytest.mark.timeout(240)
def test_redis_unreachable_for_60s_producers_do_not_notice(pipe: Pipeline) -> None:
    """30 s frozen (SIGSTOP: connections open, no answer, as in a network partition), then
    killed and away 30 s more (connections refused), then back empty."""
    rate, count = 5.0, 3
    producers = Producers(pipe.stack, "away-", count=count, rate=rate).start()
    flowing(pipe, "away-")
    time.sleep(2)
    pipe.redis.pause()  # SIGSTOP
    down = time.monotonic()
    time.sleep(30)
    pipe.redis.kill()
    time.sleep(30)
    pipe.redis.start()
    back = time.monotonic()
    recovery = pipe.recovery(back)
    assert producers.stop() == [0] * count  # none errored
    journal = producers.journal()
    assert journal.errors == []
    during = journal.window(down, back)
    before = journal.window(0, down)
    # They kept appending at their pace, without waiting on the broker: any append that
    # touched it would have waited its 5 s connect or 30 s socket timeout.
    assert len(during) >= 0.8 * rate * count * (back - down), latency_summary(during)
    assert max(during) < 2.0, latency_summary(during)
    result = pipe.check("away-", journal)
    pipe.all_workers_consuming()
    assert recovery.started < RECOVERY_BOUND, recovery
    report("redis-away-60s", purchases=len(journal.acked), outage=f"{back - down:.0f}s",
           recovery=recovery, duplicates=sum(result.duplicates.values()),
           before=latency_summary(before), during=latency_summary(during))  # fmt: skip


@pytest.mark.timeout(180)
def test_acks_lost_when_the_broker_dies_before_the_pump_reads_them(pipe: Pipeline) -> None:
    """Tasks done, acks in Redis, pump not yet there: Redis dies. The pump re-sends them
    all; the ledger absorbs the second deliveries."""
    mains = [w.pid for w in pipe.workers]
    assert pipe.pump is not None
    with paused(mains):  # workers hold off while the pump publishes the burst
        burst = Producers(pipe.stack, "acks-", count=1, rate=0, max_count=100).start()
        assert burst.wait(60) == [0]
        # Each paused worker may hold one message in its socket already (BRPOP answered).
        wait_until("the burst published", lambda: pipe.queued() >= 200 - len(mains), 30, 0.1)
        with paused([pipe.pump.pid]):  # before the workers resume
            for pid in mains:
                os.kill(pid, signal.SIGCONT)
            journal = burst.journal()
            ids = set(journal.acked)

            def all_done() -> bool:
                snap = pipe.stack.ledger()
                return all(ids <= set(snap[t]) for t in ("warehouse", "finance"))

            wait_until("the burst done", all_done, 60, 0.2)
            wait_until("its acks waiting", lambda: pipe.ack_queue_length() >= 200, 30, 0.1)
            unread = pipe.ack_queue_length()
            pipe.redis.restart()  # kill -9: the acks are gone, the tasks were done
        back = time.monotonic()
    recovery = pipe.recovery(back)
    result = pipe.check("acks-", journal)
    snap = pipe.stack.ledger()
    for target in ("warehouse", "finance"):
        assert all(snap[target][p] >= 2 for p in ids), target  # redelivered, absorbed
    report("acks-lost", purchases=len(ids), acks_lost=unread, recovery=recovery,
           duplicates=sum(result.duplicates.values()))  # fmt: skip
