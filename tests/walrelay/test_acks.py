"""Worker-side acks: tasks sent by the pump are acked to their WAL's queue, success or
failure; any other task is left alone. Runs on kombu's in-memory transport."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from celery.signals import task_unknown

from tasks.app import PurchaseApp, create_app
from tasks.config import Settings
from walrelay import acks
from walrelay.broker import COPY_HEADER, Ack, ack_queue, decode_ack

pytestmark = pytest.mark.timeout(30)
WAL = "c" * 32


@pytest.fixture
def app() -> Iterator[PurchaseApp]:
    application = create_app(Settings(broker_url="memory://"))
    yield application
    application.close()


def fake_task(app: PurchaseApp, task_id: str) -> Any:
    return SimpleNamespace(app=app, request=SimpleNamespace(id=task_id))


def received(app: PurchaseApp, wal_id: str = WAL) -> list[Ack | None]:
    out: list[Ack | None] = []
    with app.connection_for_read() as conn:
        queue = conn.SimpleQueue(ack_queue(wal_id), no_ack=True)
        try:
            while True:
                try:
                    msg = queue.get(timeout=0.1)
                except queue.Empty:
                    return out
                assert msg.body is not None
                out.append(decode_ack(msg.body))
        finally:
            queue.close()


def test_success_and_failure_are_acked_to_the_wal_queue(app: PurchaseApp) -> None:
    acks.on_task_success(sender=fake_task(app, f"{WAL}-7-warehouse"))
    acks.on_task_failure(sender=fake_task(app, "x"), task_id=f"{WAL}-8-finance",
                         exception=RuntimeError("no stock"))  # fmt: skip
    assert received(app) == [
        Ack(WAL, 7, "warehouse", True, None),
        Ack(WAL, 8, "finance", False, "RuntimeError('no stock')"),
    ]


def test_tasks_not_sent_by_a_pump_are_not_acked(app: PurchaseApp) -> None:
    acks.on_task_success(sender=fake_task(app, "0f0c6e52-5a0e-4b8e-9d6f-2b1c3f8a9e11"))
    acks.on_task_success(sender=None)
    assert received(app) == []


def test_an_unsendable_ack_is_logged_not_raised(app: PurchaseApp, monkeypatch: Any) -> None:
    def broken(*_: Any, **__: Any) -> None:
        raise ConnectionError("broker down")

    monkeypatch.setattr(acks, "send_ack", broken)
    acks.on_task_success(sender=fake_task(app, f"{WAL}-1-warehouse"))  # no exception


def test_acks_name_the_copy_the_worker_ran(app: PurchaseApp) -> None:
    request = SimpleNamespace(id=f"{WAL}-9-warehouse", headers={COPY_HEADER: "r1.7"})
    task: Any = SimpleNamespace(app=app, request=request)
    acks.on_task_success(sender=task)
    acks.on_task_failure(sender=task, task_id=f"{WAL}-9-warehouse", exception=KeyError("k"))
    assert received(app) == [
        Ack(WAL, 9, "warehouse", True, None, "r1.7"),
        Ack(WAL, 9, "warehouse", False, "KeyError('k')", "r1.7"),
    ]


def test_a_task_the_worker_does_not_know_is_acked_as_failed(app: PurchaseApp) -> None:
    """Celery rejects it without any failure signal: without this ack the pump would wait
    for it forever (and pin the log)."""

    class Consumer:  # hashable, as Celery's is (signals key on their sender)
        hostname = "w1@host"

    consumer = Consumer()
    consumer.app = app  # type: ignore[attr-defined]
    message = SimpleNamespace(headers={COPY_HEADER: "r1.8"})
    task_unknown.send(sender=consumer, message=message, exc=KeyError("x"), name="shop.gone",
                      id=f"{WAL}-3-finance")  # fmt: skip
    (ack,) = received(app)
    assert ack is not None and (ack.lsn, ack.target, ack.ok, ack.copy) == (3, "finance", False,
                                                                          "r1.8")  # fmt: skip
    assert ack.error is not None and "NotRegistered('shop.gone')" in ack.error
