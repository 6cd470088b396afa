"""walrelay.worker.consumer without a broker: the stuck-consumer verdicts, and the bounded reconnect
backoff measured against a closed port."""

from __future__ import annotations

import time

import pytest
from celery.exceptions import WorkerShutdown
from kombu.exceptions import OperationalError

from tasks.app import create_app
from tasks.config import Settings
from tests.support.stack import free_port
from walrelay.worker.consumer import (
    MAX_HEALS,
    RECONNECT_MAX,
    Consumer,
    ConsumerStalledError,
    StuckDetector,
    Verdict,
    Watchdog,
)


def look(d: StuckDetector, idle: bool, started: int, queued: int | None) -> Verdict:
    return d.observe(idle, started, lambda: queued)


def test_idle_with_queued_work_twice_in_a_row_means_reconnect() -> None:
    d = StuckDetector()
    assert look(d, True, 5, 3) is Verdict.SUSPECT
    assert look(d, True, 5, 3) is Verdict.RECONNECT
    assert d.heals == 1 and d.strikes == 0


def test_progress_busy_or_empty_queues_are_not_stuck() -> None:
    d = StuckDetector()
    assert look(d, True, 5, 3) is Verdict.SUSPECT
    assert look(d, True, 6, 3) is Verdict.OK  # a task started meanwhile
    assert look(d, False, 6, 3) is Verdict.OK  # a long task running
    assert look(d, True, 6, 0) is Verdict.OK  # nothing to do
    assert look(d, True, 6, None) is Verdict.OK  # broker down: reconnection's business
    assert d.strikes == 0


def test_the_broker_is_asked_only_about_an_idle_worker_that_made_no_progress() -> None:
    d = StuckDetector()
    asked: list[bool] = []

    def queued() -> int:
        asked.append(True)
        return 1

    d.observe(False, 1, queued)  # busy
    d.observe(True, 2, queued)  # a task started since
    assert asked == []
    d.observe(True, 2, queued)
    assert asked == [True]


def test_reconnections_that_do_not_help_end_in_exit() -> None:
    d = StuckDetector()
    verdicts = [look(d, True, 0, 1) for _ in range(2 * (MAX_HEALS + 1))]
    assert verdicts.count(Verdict.RECONNECT) == MAX_HEALS
    assert verdicts[-1] is Verdict.EXIT
    assert look(d, True, 1, 1) is Verdict.OK and d.heals == 0  # progress forgives


class FakeProbe:
    """Stands in for the broker query (the fault suite runs the real one)."""

    def __init__(self, waiting: int) -> None:
        self.count = waiting
        self.asked: list[list[str]] = []

    def waiting(self, queues: list[str]) -> int:
        self.asked.append(queues)
        return self.count


def test_check_raises_into_the_event_loop_then_shuts_the_worker_down() -> None:
    class Queue:
        name = "warehouse"

    class Parent:
        connection = object()
        task_consumer = type("TaskConsumer", (), {"queues": [Queue()]})()

    step = Watchdog.__new__(Watchdog)
    probe = FakeProbe(3)
    step.detector, step.probe = StuckDetector(), probe  # type: ignore[assignment]
    raised: list[type[BaseException]] = []
    for _ in range(2 * (MAX_HEALS + 1)):
        try:
            step.check(Parent())
        except (ConsumerStalledError, WorkerShutdown) as exc:
            raised.append(type(exc))
    assert raised == [ConsumerStalledError] * MAX_HEALS + [WorkerShutdown]
    assert isinstance(ConsumerStalledError(), OSError)  # every transport's connection error
    assert probe.asked[0] == ["warehouse"]


def test_the_watchdog_needs_the_event_loop() -> None:
    class Parent:
        hub = None

    step = Watchdog.__new__(Watchdog)
    assert step.include_if(Parent()) is False


@pytest.mark.timeout(60)
def test_reconnect_pauses_are_bounded() -> None:
    """Two failed attempts against a closed port: 0.5 + 1.0 s of pauses (kombu's default
    would be 2 + 4 s), and never more than RECONNECT_MAX between attempts."""
    app = create_app(Settings(broker_url=f"redis://127.0.0.1:{free_port()}/0"))
    app.conf.broker_connection_max_retries = 2
    consumer = Consumer.__new__(Consumer)
    consumer.app = app
    consumer.first_connection_attempt = True
    consumer.broker_connection_retry_attempt = 0
    started = time.monotonic()
    with pytest.raises(OperationalError):
        consumer.ensure_connected(app.connection_for_read())
    elapsed = time.monotonic() - started
    assert 1.4 <= elapsed < 2 * RECONNECT_MAX + 1.0, elapsed
