"""Flower sees a pumped task the moment it is published (issue 11 item 5): the pump sends
``task-sent`` events when the app has ``task_send_sent_event`` on, as ``send_task`` does,
and ``before_task_publish``/``after_task_publish`` handlers (tracing, Sentry) see its
publishes. Checked without Flower, with Celery's own event receiver, on Redis (events on
a fanout exchange) and RabbitMQ (a topic exchange)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery.signals import after_task_publish, before_task_publish

from tasks.app import PurchaseApp, create_app
from tasks.config import Settings
from walrelay.broker import TaskMessage
from walrelay.brokers.kombu import KombuPublisher

pytestmark = pytest.mark.timeout(90)
WAL_ID = "e" * 32


@pytest.fixture(params=["redis", "rabbitmq"])
def app(request: pytest.FixtureRequest) -> Iterator[PurchaseApp]:
    if request.param == "redis":
        url = request.getfixturevalue("redis_server").url
    else:
        url = request.getfixturevalue("rabbit_server").url
    application = create_app(Settings(broker_url=url))
    try:
        yield application
    finally:
        application.close()


def task(lsn: int, queue: str = "events-test") -> TaskMessage:
    """A task on a queue of this module's own (the RabbitMQ node is shared)."""
    return TaskMessage(f"{WAL_ID}-{lsn}-warehouse", "tasks.warehouse.reserve_stock",
                       queue, [{"purchase_id": f"ev-{lsn}"}], {})  # fmt: skip


def sent_events(app: PurchaseApp, publish: Any, want: int, timeout: float = 20) -> list[Any]:
    """The task-sent events seen by a receiver that listens while ``publish()`` runs."""
    seen: list[Any] = []
    with app.connection_for_read() as conn:
        receiver = app.events.Receiver(conn, handlers={"task-sent": seen.append})
        with receiver.consumer_context(wakeup=False) as (connection, _channel, _consumers):
            # One poll first: on Redis that is when the consumer SUBSCRIBEs to the events.
            with contextlib.suppress(TimeoutError):
                connection.drain_events(timeout=0.5)
            publish()
            deadline = time.monotonic() + timeout
            while len(seen) < want and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    connection.drain_events(timeout=0.5)
    return seen


def test_a_pumped_task_shows_as_sent_when_published(app: PurchaseApp) -> None:
    publisher = KombuPublisher.for_app(app, WAL_ID)
    try:
        publisher.session()
        seen = sent_events(app, lambda: publisher.publish([task(1), task(2)]), want=2)
    finally:
        publisher.close()
    assert [e["uuid"] for e in seen] == [task(1).task_id, task(2).task_id]
    first = seen[0]
    assert first["name"] == "tasks.warehouse.reserve_stock"
    assert first["queue"] == first["routing_key"] == "events-test"
    assert "ev-1" in first["args"]  # what Flower shows in its task list
    assert first["retries"] == 0 and first["eta"] is None


def test_no_event_when_the_app_does_not_send_them(app: PurchaseApp) -> None:
    app.conf.task_send_sent_event = False
    publisher = KombuPublisher.for_app(app, WAL_ID)
    try:
        publisher.session()
        seen = sent_events(app, lambda: publisher.publish([task(3)]), want=1, timeout=2)
    finally:
        publisher.close()
    assert seen == []


def test_publish_signals_see_the_pumps_messages(app: PurchaseApp) -> None:
    before: list[dict[str, Any]] = []
    after: list[dict[str, Any]] = []

    def on_before(sender: str, headers: dict[str, Any], **kwargs: Any) -> None:
        headers["traceparent"] = f"00-{headers['id'][:32]}-0000000000000001-01"
        before.append({"sender": sender, "id": headers["id"], **kwargs})

    def on_after(sender: str, headers: dict[str, Any], **kwargs: Any) -> None:
        after.append({"sender": sender, "id": headers["id"], **kwargs})

    before_task_publish.connect(on_before, weak=False)
    after_task_publish.connect(on_after, weak=False)
    publisher = KombuPublisher.for_app(app, WAL_ID)
    try:
        publisher.publish([task(4, "signals-test")])
        with app.connection_for_read() as conn:
            declared: Any = app.amqp.queues["signals-test"]
            queue = conn.SimpleQueue(declared, no_ack=True)
            try:
                received = queue.get(timeout=10)
            finally:
                queue.close()
    finally:
        publisher.close()
        before_task_publish.disconnect(on_before)
        after_task_publish.disconnect(on_after)
    assert [(b["sender"], b["id"], b["routing_key"]) for b in before] == [
        ("tasks.warehouse.reserve_stock", task(4).task_id, "signals-test")
    ]
    assert before[0]["body"][0] == [{"purchase_id": "ev-4"}]
    assert [(a["sender"], a["id"]) for a in after] == [
        ("tasks.warehouse.reserve_stock", task(4).task_id)
    ]
    # A header a handler added travels with the task (trace propagation).
    assert received.headers["traceparent"].startswith(f"00-{WAL_ID}")
    args, _kwargs, _embed = received.decode()
    assert args == [{"purchase_id": "ev-4"}]
