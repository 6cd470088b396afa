"""The copy header's record part through a real Celery worker on a private redis-server."""

from __future__ import annotations

import time
import uuid

import pytest
from kombu import Connection

from tests.support.stack import Stack
from walrelay.broker import Ack, TaskMessage
from walrelay.brokers.kombu import KombuPublisher
from walrelay.record import task_id

pytestmark = pytest.mark.timeout(120)
APP = "tests.walrelay.retry_app"


def test_the_worker_echoes_the_three_part_copy(stack: Stack) -> None:
    stack.start_worker(queues="rv", app=APP)
    url = stack.env()["CELERY_BROKER_URL"]
    wal_id = uuid.uuid4().hex
    pub = KombuPublisher(lambda: Connection(url), wal_id)
    sent: dict[int, str] = {}
    for lsn, name in [(5, "rv.ok"), (6, "rv.fails"), (7, "rv.retry_once")]:
        copy = f"deadbeef.{lsn}.0123456789ab"
        sent[lsn] = copy
        pub.publish([TaskMessage(task_id(wal_id, lsn, "0"), name, "rv", [lsn], {}, copy=copy)])
    acks: list[Ack] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len({a.lsn for a in acks if a.ok or a.lsn == 6}) < 3:
        acks += pub.drain_acks(1.0)
    pub.close()
    got = {(a.lsn, a.ok): a.copy for a in acks}
    assert got.get((5, True)) == sent[5], acks
    assert got.get((6, False)) == sent[6], acks
    # A task that retried itself: the retry's ack must still name the record.
    assert got.get((7, True)) == sent[7], acks
