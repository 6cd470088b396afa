"""The pump against slow workers and poison records (issue 9), with real processes: a
private redis-server, real workers (``celery -A fault_app worker``), the real pump and
producer processes. Small pump timeouts keep each case short. Each case ends with
``Pipeline.check`` (0 lost, 0 double effects, the backlog drained) plus:

- slow consumer: a backlog lasting many times ``PUMP_MAX_ACK_TIMEOUT`` on one worker:
  no dead letter, (almost) no delivery beyond one per task;
- poison: every kind of poison record mixed with good purchases: each poison record
  dead-lettered with its reason, every good purchase delivered, the pump alive and the
  broker never taken for down.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tasks.targets import FINANCE, TASK_NAMES, WAREHOUSE
from tests.support.faultkit import Pipeline, Producers, one_case, report, running_pipeline
from tests.support.stack import wait_until
from tools.brokers import RedisBroker
from tools.loadgen import purchase
from walrelay.deadletters import DeadLetterStore
from walrelay.record import Entry, TaskSpec
from walstore import Options, Wal

pytestmark = [pytest.mark.faults]

ACK_TIMEOUT, MAX_ACK_TIMEOUT = 1.0, 2.0
STALL_TIMEOUT = 20.0
PUMP_ENV = {
    "PUMP_ACK_TIMEOUT": str(ACK_TIMEOUT),
    "PUMP_MAX_ACK_TIMEOUT": str(MAX_ACK_TIMEOUT),
    "PUMP_STALL_TIMEOUT": str(STALL_TIMEOUT),
    "PUMP_MAX_ATTEMPTS": "3",
    "PUMP_RETRY_DELAY": "0.2",
}

WAREHOUSE_TASK, FINANCE_TASK = TASK_NAMES[WAREHOUSE], TASK_NAMES[FINANCE]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    with running_pipeline(tmp_path_factory.mktemp("faults-pump"), overrides=PUMP_ENV) as pipeline:
        yield pipeline


@pytest.fixture(autouse=True)
def case(pipe: Pipeline) -> Iterator[None]:
    with one_case(pipe):
        yield


@pytest.mark.timeout(240)
def test_a_slow_consumer_is_not_a_lost_message(pipe: Pipeline) -> None:
    """One worker running 5 tasks/s; purchases come at 6/s (12 tasks/s) for 15 s: the
    last ones wait ~20 s in the queue, ten times the max ack timeout."""
    for worker in pipe.workers:
        pipe.stack.stop(worker)
    pipe.workers = []
    pipe.start_workers(1, FAULT_TASK_SECONDS="0.2")
    slow = pipe.workers[0]
    try:
        producers = Producers(pipe.stack, "slow-", count=1, rate=6, max_seconds=15).start()
        assert producers.wait(60) == [0]
        journal = producers.journal()
        assert journal.errors == [] and len(journal.acked) >= 60
        longest = queue_peak(pipe, timeout=90)
        result = pipe.check("slow-", journal)
    finally:
        pipe.stack.stop(slow)
        pipe.workers.remove(slow)
    effects = sum(result.effects.values())
    deliveries = sum(result.deliveries.values())
    assert deliveries <= 1.05 * effects, result.as_dict()
    assert longest / 5.0 >= 4 * MAX_ACK_TIMEOUT, longest  # the backlog did last
    report("slow-consumer", purchases=len(journal.acked), peak_queued=longest,
           deliveries=deliveries, effects=effects)  # fmt: skip


def queue_peak(pipe: Pipeline, timeout: float) -> int:
    """The longest the task queues got, watched until they are empty."""
    peak = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queued = pipe.queued()
        peak = max(peak, queued)
        if peak and not queued:
            break
        time.sleep(0.2)
    return peak


SURROGATE = "\ud800"  # valid JSON ("\\ud800"), not encodable as UTF-8


def poison(pid: str) -> list[tuple[str, bytes]]:
    """(what, payload) of every kind of poison record; the last one also holds a good
    warehouse task for purchase ``pid``."""
    good = purchase(pid, 0)

    def one(name: str, queue: str, args: list[object]) -> bytes:
        return Entry(f"poison-{name}", (TaskSpec("t", name, queue, args),)).encode()

    return [
        ("undecodable", b"\xff not json"),
        ("undecodable", b"[" * 50_000),
        ("Celery's own", one("celery.backend_cleanup", "warehouse", [])),
        ("not registered", one("os.system", "warehouse", ["rm -rf /"])),
        ("reserved", one(WAREHOUSE_TASK, "unacked", [good])),
        ("WRONGTYPE", one(WAREHOUSE_TASK, "poison-hash", [good])),
        ("surrogate", one(WAREHOUSE_TASK, "warehouse", [{**good, "customer": SURROGATE}])),
        ("NotRegistered", one("fault.pump_only", "warehouse", [])),
        ("did not move", one(WAREHOUSE_TASK, "nobody", [good])),
        ("surrogate", Entry(pid, (TaskSpec("warehouse", WAREHOUSE_TASK, "warehouse", [good]),
                                  TaskSpec("finance", FINANCE_TASK, "finance", [SURROGATE]))
                            ).encode()),
    ]  # fmt: skip


@pytest.mark.timeout(240)
def test_poison_records_are_dead_lettered_and_the_rest_flows(pipe: Pipeline) -> None:
    assert pipe.pump is not None
    pipe.stack.stop(pipe.pump)  # a pump whose app knows a task no worker has
    pipe.start_pump(app="fault_app", FAULT_PUMP_TASK="1")
    pump = pipe.pump
    assert pump is not None
    assert isinstance(pipe.broker, RedisBroker)
    pipe.broker.server.client().hset("poison-hash", "k", "v")  # a key that is not a list
    producers = Producers(pipe.stack, "good-", count=2, rate=10, max_seconds=60).start()
    time.sleep(2)
    records = poison("mixed-1")
    wal = Wal.open(pipe.stack.wal_dir, Options.from_env(pipe.stack.env()))
    try:
        lsns = {wal.append(payload): what for what, payload in records}
    finally:
        wal.close()
    store = DeadLetterStore(str(pipe.stack.wal_dir))

    def all_dead() -> bool:
        return set(lsns) <= {d.lsn for d in store.list()}

    wait_until("every poison record dead-lettered", all_dead, STALL_TIMEOUT + 60, 0.5)
    time.sleep(2)
    assert producers.stop() == [0, 0]
    journal = producers.journal()
    assert journal.errors == []
    result = pipe.check("good-", journal, dead=lsns)
    letters = {d.lsn: d for d in store.list()}
    for lsn, what in lsns.items():
        assert what in letters[lsn].reason, (what, letters[lsn].to_json())
    mixed = max(lsns)
    assert list(letters[mixed].targets) == ["finance"]
    snap = pipe.stack.ledger()
    # (Delivered twice if it shared a batch with the WRONGTYPE task: the batch is published
    # again one by one to find the culprit; the ledger absorbs the repeat.)
    assert "mixed-1" in snap["warehouse"] and "mixed-1" not in snap["finance"]
    assert pump.poll() is None, "the pump exited"
    log = pipe.stack.log_of(pump)
    assert "broker unavailable" not in log and "new broker session" not in log
    assert "Traceback" not in log
    report("poison", purchases=len(journal.acked), poison=len(lsns),
           duplicates=sum(result.duplicates.values()))  # fmt: skip
