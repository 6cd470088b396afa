"""The whole pipeline with real processes: a private redis-server, real Celery workers,
the real pump (``celery -A worker pump``) and producers appending to a real log."""

from __future__ import annotations

import json
import signal
import time

import pytest

from tests.support.stack import Stack, wait_until

pytestmark = [pytest.mark.slow]


def done(stack: Stack, ids: list[str]) -> bool:
    snap = stack.ledger()
    return all(set(ids) <= set(snap[t]) for t in ("warehouse", "finance"))


def confirmed(stack: Stack) -> bool:
    status = stack.wal_status()
    return status.pending == 0 and status.low_water_mark == status.next_lsn


def dead_letters(stack: Stack) -> list[dict[str, object]]:
    out = stack.celery("deadletters", "list", "--json")
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


@pytest.mark.timeout(240)
def test_2000_purchases_from_4_producers_reach_both_targets_once(stack: Stack) -> None:
    stack.overrides = {"WAL_SYNC": "always"}
    workers = [stack.start_worker(), stack.start_worker()]
    pump = stack.start_pump()
    pump_started = time.monotonic()
    ids = stack.produce(processes=4, per_process=500)
    assert len(set(ids)) == 2000
    assert stack.wal_status().segments > 10  # 16 KiB segments: the log rolled many times
    wait_until("2000 purchases in both targets", lambda: done(stack, ids), 150, 0.5)
    wait_until("every entry confirmed", lambda: confirmed(stack), 30, 0.2)
    snap = stack.ledger()
    for target in ("warehouse", "finance"):
        assert set(snap[target]) == set(ids), target  # exactly once in effect: one row each
        assert set(snap[target].values()) == {1}, target  # and no redelivery was needed
    wait_until("sealed segments pruned", lambda: stack.wal_status().segments == 1, 10, 0.2)
    cli = stack.celery("ledger", "--json")
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout) == snap
    assert stack.stop(pump) == 0
    pump_seconds = time.monotonic() - pump_started
    for worker in workers:
        stack.stop(worker)
    log = stack.log_of(pump)
    # At most ~1 progress line a second (never one per record), however long it ran.
    assert "published" in log and log.count("pump: published") <= pump_seconds + 5


@pytest.mark.timeout(180)
def test_a_failing_purchase_is_dead_lettered_and_replayed_once_fixed(stack: Stack) -> None:
    stack.overrides = {"PUMP_MAX_ATTEMPTS": "3", "PUMP_RETRY_DELAY": "0.1"}
    worker = stack.start_worker(env={"WAREHOUSE_REJECT_SKUS": "BROKEN"})
    stack.start_pump()
    bad = stack.produce(1, 1, prefix="bad", skus="BROKEN")
    good = stack.produce(2, 10, prefix="good")
    letters = wait_until("a dead letter", lambda: dead_letters(stack), 60, 0.5)
    # Target "0": the warehouse's task, the first of a purchase's record.
    assert [(d["key"], list(d["targets"])) for d in letters] == [(bad[0], ["0"])]
    wait_until("the watermark passes it", lambda: confirmed(stack), 30, 0.2)
    assert done(stack, good)
    snap = stack.ledger()
    assert bad[0] not in snap["warehouse"] and snap["finance"][bad[0]] == 1

    stack.stop(worker)  # "the fix": a worker that accepts the SKU
    stack.start_worker()
    out = stack.celery("deadletters", "replay", str(letters[0]["id"]))
    assert out.returncode == 0, out.stderr
    assert "replayed as LSN 21" in out.stdout
    wait_until("the replayed purchase delivered", lambda: done(stack, bad), 60, 0.2)
    wait_until("confirmed again", lambda: confirmed(stack), 30, 0.2)
    snap = stack.ledger()
    assert snap["warehouse"][bad[0]] == 1 and snap["finance"][bad[0]] == 1
    assert dead_letters(stack) == []
    out = stack.celery("deadletters", "purge", "21")
    assert out.returncode != 0 and "no dead letter 21" in out.stderr


@pytest.mark.timeout(240)
def test_one_pump_per_wal_and_a_restarted_pump_resumes(stack: Stack) -> None:
    pump = stack.start_pump()
    second = stack.celery("pump", timeout=60)
    assert second.returncode != 0
    assert f"another pump (pid {pump.pid}) is running for {stack.wal_dir}" in second.stderr
    worker = stack.start_worker()
    first = stack.produce(2, 15, prefix="a")
    wait_until("first batch confirmed", lambda: done(stack, first) and confirmed(stack), 60, 0.2)
    assert stack.stop(pump) == 0
    later = stack.produce(2, 15, prefix="b")
    time.sleep(0.5)
    assert not set(later) & set(stack.ledger()["warehouse"])  # nobody publishes them
    pump = stack.start_pump()
    assert "resuming at LSN 30 (low water mark)" in stack.log_of(pump)
    wait_until("second batch confirmed", lambda: done(stack, later) and confirmed(stack), 60, 0.2)
    snap = stack.ledger()
    assert all(snap[t][p] == 1 for t in snap for p in first)  # nothing re-sent below the LWM

    # kill -9 mid-stream: the next pump re-sends from the persisted LWM; effects stay once.
    burst = stack.produce(2, 150, prefix="c")
    time.sleep(0.3)
    stack.stop(pump, signal.SIGKILL)
    pump = stack.start_pump()
    wait_until("burst confirmed", lambda: done(stack, burst) and confirmed(stack), 120, 0.3)
    snap = stack.ledger()
    assert set(snap["warehouse"]) == set(snap["finance"]) == set(first + later + burst)
    assert stack.stop(pump) == 0
    stack.stop(worker)


@pytest.mark.timeout(180)
def test_a_broker_restart_makes_the_pump_resend_in_flight_tasks(stack: Stack) -> None:
    stack.overrides = {"PUMP_ACK_TIMEOUT": "120"}
    pump = stack.start_pump()
    ids = stack.produce(1, 20)
    client = stack.redis.client()
    wait_until("tasks queued", lambda: client.llen("warehouse") == 20, 30)
    restarted = time.monotonic()
    stack.redis.restart()  # kill -9: the queued tasks are gone
    client = stack.redis.client()
    wait_until("tasks re-sent", lambda: client.llen("warehouse") == 20, 30)
    assert time.monotonic() - restarted < 10  # at once, not after the 120 s ack timeout
    assert "re-sending everything in flight" in stack.log_of(pump)
    stack.start_worker()
    wait_until("delivered", lambda: done(stack, ids) and confirmed(stack), 60, 0.2)
