"""Crash the broker (issues 4 and 12), on every broker: a private redis-server without
persistence, a private RabbitMQ node, a Redis Sentinel set (primary, replica, three
sentinels). Two real workers, the real pump and producer processes appending
throughout. Each case ends with ``Pipeline.check``: the backlog drains, every
acknowledged purchase has exactly one effect at both targets, none is lost, no effect is
unknown, ``walstore status`` pending 0.

Faults in each broker's terms (``tools.brokers``): a Redis kill -9 loses everything
queued; a RabbitMQ node keeps its durable queues, so the pump must not send its window
again; a Sentinel primary killed fails over to the replica.

One pipeline per broker serves the module (cases run in order; each starts by healing
whatever an earlier one left dead). ``make faults`` runs this suite alone (``pytest -m
faults``); the long outage runs with ``-m slow``.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from tests.support.faultkit import (
    RECOVERY_BOUNDS,
    Pipeline,
    Producers,
    latency_summary,
    one_case,
    paused,
    report,
    running_pipeline,
    slow_on,
)
from tests.support.stack import wait_until
from tools.brokers import KINDS

pytestmark = [pytest.mark.faults]
# Purchases/s per producer (3 producers): what two single-process workers keep up with
# on a loaded 2-core machine, so that each case's backlog drains in seconds.
RATE = 4.0


@pytest.fixture(scope="module", params=KINDS)
def pipe(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[Pipeline]:  # fmt: skip
    kind = str(request.param)
    with running_pipeline(tmp_path_factory.mktemp(f"faults-{kind}"), kind) as pipeline:
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

    wait_until(f"purchases {prefix}* flowing", some, 60, 0.2)


def crash_and_recover(pipe: Pipeline, down: float) -> float:
    """kill -9 of the broker, ``down`` s away, back; returns when it served again."""
    broker = pipe.broker
    broker.crash()
    back = time.monotonic()  # a failover: serving again already
    time.sleep(down)
    broker.recover()
    return back if broker.fails_over else time.monotonic()


@pytest.mark.timeout(240)
def test_broker_killed_mid_stream_and_restarted_twice(pipe: Pipeline) -> None:
    producers = Producers(pipe.stack, "kill2-", count=3, rate=RATE).start()
    flowing(pipe, "kill2-")
    before = sessions(pipe)
    recoveries, queued = [], []
    for _ in range(2):
        time.sleep(1.0)
        with paused([w.pid for w in pipe.workers]):  # slow workers: a queue builds up
            time.sleep(1.0)
            queued.append(pipe.queued())
            assert queued[-1] > 0
            back = crash_and_recover(pipe, 3)
        recoveries.append(pipe.recovery(back))
    assert producers.stop() == [0, 0, 0]
    journal = producers.journal()
    assert journal.errors == []
    result = pipe.check("kill2-", journal)
    pipe.all_workers_consuming()
    resent = sessions(pipe) - before
    if pipe.broker.kind == "redis":
        assert resent == 2  # each restart came back empty: all in flight sent again
    if pipe.broker.kind == "rabbitmq":
        assert resent == 0  # the node kept its queues: nothing sent again
    for rec in recoveries:
        assert rec.started < RECOVERY_BOUNDS[pipe.broker.kind], rec
    report(f"{pipe.broker.kind}-kill-twice", purchases=len(journal.acked), queued=queued,
           window_resent=resent, recovery=recoveries,
           duplicates=sum(result.duplicates.values()))  # fmt: skip


@slow_on("rabbitmq", "sentinel")
@pytest.mark.timeout(240)
def test_broker_down_when_the_pump_and_workers_start(pipe: Pipeline) -> None:
    for proc in [*pipe.workers, pipe.pump]:
        assert proc is not None
        pipe.stack.stop(proc)
    pipe.workers, pipe.pump = [], None
    pipe.broker.down()
    producers = Producers(pipe.stack, "cold-", count=3, rate=RATE).start()
    pipe.start_workers(2, wait=False)
    pipe.start_pump()  # it starts, with nothing to talk to
    for worker in pipe.workers:
        pipe.wait_log(worker, "Cannot connect to")  # up, retrying
    time.sleep(3)
    appended_while_down = len(producers.journal().acked)
    assert appended_while_down > 0
    pipe.broker.up()
    recovery = pipe.recovery(time.monotonic())
    for worker in pipe.workers:
        pipe.wait_log(worker, " ready.")
    assert producers.stop() == [0, 0, 0]
    journal = producers.journal()
    assert journal.errors == []
    result = pipe.check("cold-", journal)
    pipe.all_workers_consuming()
    assert recovery.started < RECOVERY_BOUNDS[pipe.broker.kind], recovery
    report(f"{pipe.broker.kind}-down-at-start", purchases=len(journal.acked), recovery=recovery,
           duplicates=sum(result.duplicates.values()))  # fmt: skip


def unreachable(pipe: Pipeline, frozen: float, dead: float) -> None:
    """``frozen`` s SIGSTOPped (connections open, no answer, as in a network partition),
    then killed and away ``dead`` s more (connections refused), then back. A Sentinel
    set fails over from the frozen primary within seconds: its clients see that."""
    rate, count = 5.0, 3
    prefix = f"away{frozen + dead:.0f}-"
    producers = Producers(pipe.stack, prefix, count=count, rate=rate).start()
    flowing(pipe, prefix)
    time.sleep(2)
    down = time.monotonic()
    pipe.broker.pause()
    back = time.monotonic()  # a failover: serving again already
    at_back = pipe.snapshot()
    time.sleep(frozen)
    pipe.broker.kill_paused()
    time.sleep(dead)
    pipe.broker.heal()
    if not pipe.broker.fails_over:
        back, at_back = time.monotonic(), pipe.snapshot()
    recovery = pipe.recovery(back, before=at_back)
    assert producers.stop() == [0] * count  # none errored
    journal = producers.journal()
    assert journal.errors == []
    during = journal.window(down, back)
    before = journal.window(0, down)
    # They kept appending at their pace, without waiting on the broker: any append that
    # touched it would have waited its 5 s connect or 30 s socket timeout.
    assert len(during) >= 0.8 * rate * count * (back - down), latency_summary(during)
    if during:
        assert max(during) < 2.0, latency_summary(during)
    result = pipe.check(prefix, journal)
    pipe.all_workers_consuming()
    assert recovery.started < RECOVERY_BOUNDS[pipe.broker.kind], recovery
    report(f"{pipe.broker.kind}-away-{frozen + dead:.0f}s", purchases=len(journal.acked),
           outage=f"{back - down:.0f}s", recovery=recovery,
           duplicates=sum(result.duplicates.values()), before=latency_summary(before),
           during=latency_summary(during))  # fmt: skip


@slow_on("rabbitmq", "sentinel")
@pytest.mark.timeout(240)
def test_broker_unreachable_for_20s_producers_do_not_notice(pipe: Pipeline) -> None:
    unreachable(pipe, frozen=10, dead=10)


@pytest.mark.soak
@pytest.mark.timeout(300)
def test_broker_unreachable_for_60s_producers_do_not_notice(pipe: Pipeline) -> None:
    unreachable(pipe, frozen=30, dead=30)


@pytest.mark.timeout(240)
def test_acks_lost_when_the_broker_loses_everything_before_the_pump_reads_them(
    pipe: Pipeline,
) -> None:
    """Tasks done, acks in the broker, pump not yet there: the broker loses everything
    (Redis restarted empty, a new RabbitMQ node, both Sentinel data nodes restarted
    empty). The pump sees its session marker gone and re-sends all in flight; the
    ledger absorbs the second deliveries."""
    mains = [w.pid for w in pipe.workers]
    assert pipe.pump is not None
    before = sessions(pipe)
    with paused(mains):  # workers hold off while the pump publishes the burst
        burst = Producers(pipe.stack, "acks-", count=1, rate=0, max_count=100).start()
        assert burst.wait(60) == [0]
        # Each paused worker may hold one message in its socket already.
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
            if pipe.broker.kind == "rabbitmq":
                time.sleep(1)  # acks are pushed on to the pump's socket: not countable
            else:
                wait_until("its acks waiting", lambda: pipe.ack_queue_length() >= 200, 30, 0.1)
            unread = pipe.ack_queue_length()
            pipe.broker.lose_everything()
        back = time.monotonic()
    recovery = pipe.recovery(back)
    result = pipe.check("acks-", journal)
    assert sessions(pipe) == before + 1  # the loss seen: everything in flight sent again
    if pipe.broker.kind != "rabbitmq":
        # RabbitMQ had pushed the acks into the paused pump's socket already: it may read
        # some before it notices the broker is gone. Elsewhere every one was lost.
        snap = pipe.stack.ledger()
        for target in ("warehouse", "finance"):
            assert all(snap[target][p] >= 2 for p in ids), target  # redelivered, absorbed
    report(f"{pipe.broker.kind}-acks-lost", purchases=len(ids), acks_unread=unread,
           recovery=recovery, duplicates=sum(result.duplicates.values()))  # fmt: skip
