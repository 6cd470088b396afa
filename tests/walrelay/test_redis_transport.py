"""walrelay.worker.redis_transport: closing a connection whose broker died while a task was held.

The state built here is the one Celery 5.7's consumer leaves after a broker loss (see the
module's docstring): a delivered, unacked message in the channel, the channel not yet
closed, the transport already detached by ``collect()``. Celery then closes the
connection through ``kombu.common.ignore_errors``, which swallows connection errors only.
"""

from __future__ import annotations

from typing import Any

import pytest
from kombu import Connection, Message, Queue
from kombu.common import ignore_errors

from tasks.app import create_app
from tasks.config import Settings
from tests.support.stack import RedisServer
from walrelay.worker.consumer import Consumer
from walrelay.worker.redis_transport import Channel, use_fixed_channel

pytestmark = pytest.mark.timeout(60)

STOCK = pytest.param(
    False,
    id="stock-kombu",
    marks=pytest.mark.xfail(
        raises=AttributeError,
        strict=False,
        reason="the kombu bug walrelay.worker.redis_transport works around; if this passes, "
        "kombu fixed it and the fix can go",
    ),
)


def hold_a_task_then_lose_the_broker(server: RedisServer, fixed: bool) -> tuple[Connection, Any]:
    conn = Connection(server.url)
    if fixed:
        assert use_fixed_channel(conn)
    queue = Queue("warehouse")
    with conn.Producer() as producer:
        producer.publish({"n": 1}, routing_key="warehouse", declare=[queue])
    held: list[Message] = []
    consumer = conn.Consumer([queue], callbacks=[lambda _body, msg: held.append(msg)])
    consumer.consume()
    conn.drain_events(timeout=5)
    assert len(held) == 1 and not held[0].acknowledged
    channel = conn.default_channel
    assert isinstance(channel, Channel) == fixed
    server.kill()
    conn._do_close_transport()  # what collect() ends with: transport.client = None
    return conn, channel


@pytest.mark.parametrize("fixed", [True, STOCK])
def test_closing_after_the_broker_died_is_not_fatal(redis_server: RedisServer, fixed: bool) -> None:
    conn, channel = hold_a_task_then_lose_the_broker(redis_server, fixed)
    ignore_errors(conn, conn.close)  # raised AttributeError with the stock channel
    assert channel.closed
    assert channel.qos._delivered.restored  # not tried again on a later close


def test_a_fixed_connection_works_as_before(redis_server: RedisServer) -> None:
    with Connection(redis_server.url) as conn:
        assert use_fixed_channel(conn)
        queue = conn.SimpleQueue("q")
        queue.put({"n": 7})
        msg = queue.get(timeout=5)
        msg.ack()
        assert msg.payload == {"n": 7}
        assert conn.as_uri().startswith("redis://")  # Flower reads the scheme
        queue.close()


def test_only_redis_connections_are_touched() -> None:
    with Connection("amqp://guest@127.0.0.1:1//") as conn:
        assert not use_fixed_channel(conn)


def test_the_worker_consumer_uses_it(redis_server: RedisServer) -> None:
    app = create_app(Settings(broker_url=redis_server.url))
    try:
        # ensure_connected is where Consumer shapes every connection it opens (built
        # bare as in test_watchdog: a whole Consumer needs a running worker).
        consumer = Consumer.__new__(Consumer)
        consumer.app = app
        consumer.first_connection_attempt = True
        consumer.broker_connection_retry_attempt = 0
        conn = consumer.ensure_connected(app.connection_for_read())
        try:
            assert isinstance(conn.default_channel, Channel)
        finally:
            conn.close()
    finally:
        app.close()
