"""Redis Sentinel (issue 12): the worker-side fixes leave the Sentinel transport alone,
acks take the Redis path through the sentinels, and the publisher tells a failover that
kept everything from one to a replica that had not caught up. Against a private set
(tools.sentinel: a primary, a replica, three sentinels on loopback ports)."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from typing import Any, cast

import pytest
from kombu import Connection
from kombu.transport import redis as kombu_redis

from tasks.app import PurchaseApp, create_app
from tasks.config import Settings
from tools.sentinel import SentinelCluster
from walrelay import acks
from walrelay.broker import Ack, TaskMessage
from walrelay.brokers.kombu import KombuPublisher
from walrelay.errors import BrokerUnavailableError
from walrelay.worker.redis_transport import use_fixed_channel

pytestmark = pytest.mark.timeout(90)
WAL_ID = "5" * 32


@pytest.fixture
def app(sentinel_cluster: SentinelCluster) -> Iterator[PurchaseApp]:
    settings = Settings(broker_url=sentinel_cluster.url,
                        broker_transport_options=sentinel_cluster.transport_options)  # fmt: skip
    application = create_app(settings)
    try:
        yield application
    finally:
        application.close()


def task(lsn: int) -> TaskMessage:
    return TaskMessage(f"{WAL_ID}-{lsn}-warehouse", "tasks.warehouse.reserve_stock",
                       "warehouse", [{"purchase_id": f"s{lsn}"}], {})  # fmt: skip


def retry(call: Any, seconds: float = 30) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        try:
            return call()
        except BrokerUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_the_worker_channel_fix_leaves_sentinel_alone(app: PurchaseApp) -> None:
    """The fix swaps kombu's Redis channel class; on a Sentinel connection that sent
    commands to the sentinels themselves (``unknown command 'SET'``)."""
    conn = app.connection_for_read()
    try:
        assert not use_fixed_channel(conn)
        assert cast(Any, conn.transport).Channel is kombu_redis.SentinelChannel
        with conn.SimpleQueue("sentinel-probe") as queue:
            queue.put({"n": 1})
            assert queue.get(timeout=5).payload == {"n": 1}
    finally:
        conn.release()


def test_acks_go_through_the_sentinels_on_the_redis_path(app: PurchaseApp) -> None:
    assert acks.is_redis(app)
    publisher = KombuPublisher.for_app(app, WAL_ID)
    try:
        publisher.session()
        acks.send_ack(app, Ack(WAL_ID, 1, "warehouse", True))
        got: list[Ack] = []
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            got = publisher.drain_acks(0.1)
    finally:
        publisher.close()
    assert got == [Ack(WAL_ID, 1, "warehouse", True)]


def test_a_failover_to_a_replica_that_missed_writes_is_a_new_session(
    app: PurchaseApp, sentinel_cluster: SentinelCluster
) -> None:
    """Replication is asynchronous: a replica promoted before it caught up lacks the
    last tasks. The marker counter is written after them, so it lacks it too."""
    publisher = KombuPublisher.for_app(app, WAL_ID)
    try:
        publisher.publish([task(1)])
        before = publisher.session()
        sentinel_cluster.wait_in_sync()
        primary = sentinel_cluster.primary()
        replica = next(n for n in sentinel_cluster.nodes if n is not primary)
        replica.signal(signal.SIGSTOP)
        primary.client().client_kill_filter(_type="replica")  # the link cut: nothing more
        try:
            publisher.publish([task(2), task(3)])  # on the primary only
            assert publisher.session() == before
            primary.kill()
        finally:
            replica.signal(signal.SIGCONT)
        sentinel_cluster.wait_failover(primary)
        assert replica.client().llen("warehouse") == 1  # task 2 and 3 are gone
        after = retry(publisher.session)
    finally:
        publisher.close()
    assert after != before  # so the pump sends everything in flight again


def test_only_plain_redis_connections_get_the_channel_fix() -> None:
    with Connection("redis://127.0.0.1:1/0") as plain:
        assert use_fixed_channel(plain)
    sentinel = Connection("sentinel://127.0.0.1:1", transport_options={"master_name": "x"})
    with sentinel:
        assert not use_fixed_channel(sentinel)
        assert cast(Any, sentinel.transport).Channel is kombu_redis.SentinelChannel
