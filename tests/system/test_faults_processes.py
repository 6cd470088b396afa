"""Kill the pipeline's own processes (issue 4): the pump, a worker's pool process mid-task,
a worker's main process, producers mid-append. Same pipeline and verdict as
test_faults.py (``Pipeline.check``): exactly one effect per acknowledged purchase and
target, none lost, none unknown, the backlog drained. The pump and worker kills run on
every broker (issue 12); the others do not involve the broker and run on Redis only.
"""

from __future__ import annotations

import random
import re
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from tasks.app import create_app
from tasks.checkout import record_purchase
from tasks.config import Settings
from tasks.targets import TARGETS
from tests.support.faultkit import (
    WALSTORE,
    Pipeline,
    Producers,
    kill_pids,
    one_case,
    paused,
    report,
    running_pipeline,
    slow_on,
)
from tests.support.stack import wait_until
from tools.brokers import KINDS
from tools.loadgen import purchase
from tools.processes import children_of, kill_busy
from walrelay import Relay
from walrelay.record import parse_task_id
from walstore import Options

pytestmark = [pytest.mark.faults]


@pytest.fixture(scope="module", params=KINDS)
def pipe(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[Pipeline]:  # fmt: skip
    kind = str(request.param)
    with running_pipeline(tmp_path_factory.mktemp(f"faults-procs-{kind}"), kind) as pipeline:
        yield pipeline


def redis_only(pipe: Pipeline) -> None:
    if pipe.broker.kind != "redis":
        pytest.skip("the broker plays no part in this fault: run on Redis only")


@pytest.fixture(autouse=True)
def case(pipe: Pipeline) -> Iterator[None]:
    with one_case(pipe):
        yield


def flowing(pipe: Pipeline, producers: Producers) -> None:
    wait_until("every producer appending",
               lambda: all(producers.path(i).exists() and " " in producers.path(i).read_text()
                           for i in range(producers.count)), 30, 0.1)  # fmt: skip


def record_slow(pipe: Pipeline, purchase_id: str, when: str) -> tuple[str, int, int]:
    """Record a purchase whose tasks sleep ``when`` ("pre"/"post") their effect (see
    fault_app) and wait until one of them is sleeping: (target, pool pid, worker pid)."""
    doc = purchase(purchase_id, 0)
    doc["items"] = [{"sku": f"slow-{when}", "qty": 1}]
    env = pipe.stack.env()
    settings = Settings.from_env(env)
    relay = Relay(create_app(settings), settings=settings.relay, wal_options=Options.from_env(env))
    try:
        lsn = record_purchase(doc, relay=relay).lsn
    finally:
        relay.close()

    def marker() -> tuple[str, int, int] | None:
        for path in pipe.marks.glob(f"*-{lsn}-*.{when}"):
            parsed = parse_task_id(path.stem)
            pids = path.read_text().split()
            if parsed is not None and parsed[1] == lsn and len(pids) == 2:
                return TARGETS[int(parsed[2])], int(pids[0]), int(pids[1])
        return None

    found: tuple[str, int, int] = wait_until(f"a {when}-effect task running", marker, 60, 0.05)
    return found


@slow_on("sentinel")  # Redis underneath: the broker cases cover its failover
@pytest.mark.timeout(150)
def test_pump_killed_mid_stream_and_restarted(pipe: Pipeline) -> None:
    producers = Producers(pipe.stack, "pump-", count=3, rate=8).start()
    flowing(pipe, producers)
    time.sleep(1)
    assert pipe.pump is not None
    old = pipe.pump
    with paused([w.pid for w in pipe.workers]):  # slow workers: entries pile up in flight
        time.sleep(1)
        assert pipe.queued() > 0
        pipe.stack.stop(old, signal.SIGKILL)
    persisted = pipe.snapshot().low_water_mark
    assert pipe.snapshot().next_lsn > persisted  # unconfirmed entries the new pump owes
    time.sleep(1)
    pipe.start_pump()
    back = time.monotonic()
    assert pipe.pump is not None
    resumed = re.search(r"resuming at LSN (\d+)", pipe.stack.log_of(pipe.pump))
    assert resumed and int(resumed.group(1)) == persisted
    recovery = pipe.recovery(back)
    assert producers.stop() == [0, 0, 0]
    journal = producers.journal()
    assert journal.errors == []
    result = pipe.check("pump-", journal)
    report(f"{pipe.broker.kind}-pump-kill", purchases=len(journal.acked), recovery=recovery,
           duplicates=sum(result.duplicates.values()))  # fmt: skip


@slow_on("sentinel")  # Redis underneath: the broker cases cover its failover
@pytest.mark.timeout(150)
def test_a_pool_process_killed_mid_task(pipe: Pipeline) -> None:
    redis_only(pipe)
    producers = Producers(pipe.stack, "child-", count=3, rate=10).start()
    flowing(pipe, producers)
    mains = {w.pid: w for w in pipe.workers}
    # After its effect and its ack, before the broker's ack: the task runs again.
    after, pool_pid, worker_pid = record_slow(pipe, "child-after", "post")
    assert worker_pid in mains
    kill_pids([pool_pid])
    # Before its effect: the effect happens once, on the redelivery.
    _, pool_pid2, worker_pid2 = record_slow(pipe, "child-before", "pre")
    kill_pids([pool_pid2])
    for pid in {worker_pid, worker_pid2}:
        pipe.wait_log(mains[pid], "exited with 'signal 9 (SIGKILL)'")
    assert all(w.poll() is None for w in pipe.workers)  # the workers replaced their pools
    assert producers.stop() == [0, 0, 0]
    journal = producers.journal()
    assert journal.errors == []
    result = pipe.check("child-", journal, extra=["child-after", "child-before"])
    snap = pipe.stack.ledger()
    assert snap[after]["child-after"] >= 2  # it arrived again; the effect is once
    report("pool-process-kill", purchases=len(journal.acked) + 2,
           duplicates=sum(result.duplicates.values()))  # fmt: skip


@slow_on("sentinel")  # Redis underneath: the broker cases cover its failover
@pytest.mark.timeout(150)
def test_a_worker_main_process_killed_mid_task(pipe: Pipeline) -> None:
    producers = Producers(pipe.stack, "main-", count=3, rate=5).start()
    flowing(pipe, producers)
    target, pool_pid, worker_pid = record_slow(pipe, "main-held", "pre")
    victim = next(w for w in pipe.workers if w.pid == worker_pid)
    pool = children_of(worker_pid)
    assert pool_pid in pool
    killed = time.monotonic()
    # Its task: unacked in Redis for an hour (the pump re-sends it); RabbitMQ requeues it.
    pipe.stack.stop(victim, signal.SIGKILL)
    kill_pids(pool)  # and its pool with it, as a service manager's kill does
    pipe.workers.remove(victim)
    pipe.start_workers(1)  # the supervisor's restart

    def delivered() -> bool:
        snap = pipe.stack.ledger()
        return all("main-held" in snap[t] for t in ("warehouse", "finance"))

    wait_until("the held task re-sent by the pump", delivered, 90, 0.2)
    redelivered_after = time.monotonic() - killed
    assert producers.stop() == [0, 0, 0]
    journal = producers.journal()
    assert journal.errors == []
    result = pipe.check("main-", journal, extra=["main-held"])
    deliveries = pipe.stack.ledger()[target]["main-held"]
    # Redis: the pump's re-send is its only delivery. Elsewhere the broker may deliver
    # it too (RabbitMQ requeues it; a Sentinel replica may hold it): one effect anyway.
    assert deliveries == 1 if pipe.broker.kind == "redis" else deliveries >= 1
    report(f"{pipe.broker.kind}-worker-main-kill", purchases=len(journal.acked) + 1,
           held_task_done_after=f"{redelivered_after:.1f}s",
           duplicates=sum(result.duplicates.values()))  # fmt: skip


@slow_on("sentinel")  # Redis underneath: the broker cases cover its failover
@pytest.mark.timeout(150)
def test_producers_killed_mid_append(pipe: Pipeline) -> None:
    redis_only(pipe)
    rng = random.Random(4)
    producers = Producers(pipe.stack, "pk-", count=6, rate=100).start()
    flowing(pipe, producers)
    how = []
    for proc in producers.procs:  # each caught in fsync (mid-append) if it can be
        time.sleep(rng.uniform(0.02, 0.2))
        how.append(kill_busy([proc.pid], wait=3.0))
        pipe.stack.stop(proc, signal.SIGKILL)
    journal = producers.journal()
    unanswered = journal.attempted - set(journal.acked)
    assert unanswered, "no producer was caught mid-append"
    again = Producers(pipe.stack, "pk-again-", count=2, rate=0, max_count=50).start()
    assert again.wait(60) == [0, 0]  # the log takes appends after the crashes
    for i in range(again.count):
        journal.add(again.path(i))
    result = pipe.check("pk-", journal)
    assert result.unacknowledged_delivered <= len(unanswered)
    verify = subprocess.run([WALSTORE, "verify", str(pipe.stack.wal_dir)],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr
    report("producer-kill", purchases=len(journal.acked), killed_mid_append=len(unanswered),
           in_fsync=sum("in fsync" in h for h in how),
           committed_unanswered=result.unacknowledged_delivered)  # fmt: skip
