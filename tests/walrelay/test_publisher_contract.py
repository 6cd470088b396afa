"""One contract, every Publisher: the in-memory stub the pump's unit tests rely on, and
the kombu publisher against a real redis-server (Redis ack fast path and the generic
kombu consumer path), a real RabbitMQ node and a real Redis Sentinel set. If the stub
passes and kombu passes, the unit tests mean something."""

from __future__ import annotations

import base64
import contextlib
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, cast

import amqp
import pytest
import redis

from tasks.app import create_app
from tasks.config import Settings
from tests.support.stack import RedisServer
from tools.rabbitmq_server import RabbitServer
from tools.sentinel import SentinelCluster
from walrelay.acks import send_ack
from walrelay.broker import COPY_HEADER, Ack, Publisher, TaskMessage, ack_queue
from walrelay.brokers.kombu import KombuPublisher
from walrelay.brokers.stub import MemoryPublisher
from walrelay.errors import BrokerUnavailableError, MessageRejectedError

pytestmark = pytest.mark.timeout(90)
WAL_ID = "a" * 32
OTHER_WAL = "b" * 32

Fetched = tuple[str, str, list[Any], dict[str, Any]]


class Harness(Protocol):
    # A stop and start keep what was queued (RabbitMQ's durable queues) or not (Redis
    # without persistence): the session must say which.
    keeps_queues: bool

    @property
    def publisher(self) -> Publisher: ...

    def fetch(self, queue: str, n: int) -> list[Fetched]: ...
    def send_ack(self, ack: Ack) -> None: ...
    def stop_broker(self) -> None: ...
    def start_broker(self) -> None: ...
    def restart_broker(self) -> None:
        """A restart that lost everything queued."""

    def outage_keeping_queues(self) -> None:
        """The broker away and back with everything it had (skips if it cannot)."""

    def make_wrong_type(self, queue: str) -> None:
        """A key of another type where ``queue`` should be (skips if it cannot)."""


class MemoryHarness:
    keeps_queues = False

    def __init__(self) -> None:
        self.publisher = self.stub = MemoryPublisher(WAL_ID)

    def fetch(self, queue: str, n: int) -> list[Fetched]:
        return [(m.task_id, m.name, m.args, m.kwargs) for m in self.stub.take(queue, n)]

    def send_ack(self, ack: Ack) -> None:
        self.stub.send_ack(ack)

    def stop_broker(self) -> None:
        self.stub.down = True

    def start_broker(self) -> None:
        self.stub.down = False

    def restart_broker(self) -> None:
        self.stub.restart()

    def make_wrong_type(self, queue: str) -> None:
        self.stub.wrong_type.add(queue)

    def outage_keeping_queues(self) -> None:
        self.stub.keeps_queues, self.stub.down = True, True
        with pytest.raises(BrokerUnavailableError):
            self.stub.session()
        self.stub.down = False


class KombuHarness:
    """The real publisher; tasks fetched as a worker would, acks sent as workers do."""

    keeps_queues = False

    def __init__(
        self, url: str, fast_acks: bool | None, options: dict[str, Any] | None = None
    ) -> None:
        self.raw_acks = fast_acks
        self.app = create_app(Settings(broker_url=url, broker_transport_options=options or {}))
        self.publisher = KombuPublisher.for_app(self.app, WAL_ID, fast_acks=fast_acks)

    def fetch(self, queue: str, n: int) -> list[Fetched]:
        out: list[Fetched] = []
        with self.app.connection_for_read() as conn:
            # The app's declaration of the queue, as its worker's (SimpleQueue's own
            # defaults would differ from it on RabbitMQ).
            simple = conn.SimpleQueue(cast(Any, self.app.amqp.queues[queue]), no_ack=True)
            try:
                for _ in range(n):
                    msg = simple.get(timeout=5)
                    args, kwargs, _embed = msg.decode()
                    out.append((msg.headers["id"], msg.headers["task"], args, kwargs))
            finally:
                simple.close()
        return out

    def send_ack(self, ack: Ack) -> None:
        send_ack(self.app, ack, raw=self.raw_acks)

    def make_wrong_type(self, queue: str) -> None:
        pytest.skip("only Redis keeps keys of other types beside its queues")

    def outage_keeping_queues(self) -> None:
        pytest.skip("a Redis without persistence keeps nothing over a restart")

    def close(self) -> None:
        self.publisher.close()
        self.app.close()


class RedisHarness(KombuHarness):
    def __init__(self, server: RedisServer, fast_acks: bool) -> None:
        super().__init__(server.url, fast_acks)
        self.server = server

    def stop_broker(self) -> None:
        self.server.kill()

    def start_broker(self) -> None:
        self.server.start()

    def restart_broker(self) -> None:
        self.server.restart()

    def make_wrong_type(self, queue: str) -> None:
        self.server.client().hset(queue, "k", "v")  # as kombu's own "unacked" hash

    def close(self) -> None:
        self.publisher.close()
        self.app.close()


class RabbitHarness(KombuHarness):
    keeps_queues = True  # durable queues, persistent messages

    def __init__(self, server: RabbitServer) -> None:
        if not server.running:
            server.start()
        purge(server, ["warehouse", "finance", ack_queue(WAL_ID)])
        super().__init__(server.url, None)
        self.server = server

    def stop_broker(self) -> None:
        self.server.kill()

    def start_broker(self) -> None:
        self.server.start()

    def restart_broker(self) -> None:
        self.server.restart(wipe=True)  # a new node: every queue gone

    def outage_keeping_queues(self) -> None:
        self.server.restart()  # kill -9 and start: durable queues recovered


class SentinelHarness(KombuHarness):
    def __init__(self, cluster: SentinelCluster) -> None:
        super().__init__(cluster.url, None, cluster.transport_options)
        self.cluster = cluster

    def stop_broker(self) -> None:
        self.cluster.kill()

    def start_broker(self) -> None:
        primary, replica = self.cluster.nodes
        primary.start()
        replica.start(["--replicaof", "127.0.0.1", str(primary.port)])

    def restart_broker(self) -> None:
        self.stop_broker()
        self.start_broker()

    def outage_keeping_queues(self) -> None:
        self.cluster.wait_in_sync()  # the replica has every write: a lossless failover
        old = self.cluster.kill_primary()
        self.cluster.wait_failover(old)


def purge(server: RabbitServer, queues: list[str]) -> None:
    """Empty what an earlier test left (purged, not deleted: a queue deleted and declared
    again at once can vanish in a crash right after, which is not what is tested)."""
    conn = amqp.Connection(f"127.0.0.1:{server.port}")
    conn.connect()
    try:
        for name in queues:
            channel = conn.channel()  # a NOT_FOUND closes it
            with contextlib.suppress(amqp.exceptions.NotFound):
                channel.queue_purge(name)
    finally:
        conn.close()


@pytest.fixture(params=["memory", "kombu-redis", "kombu-consumer", "kombu-rabbitmq",
                        "kombu-sentinel"])  # fmt: skip
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    if request.param == "memory":
        yield MemoryHarness()
        return
    if request.param == "kombu-rabbitmq":
        rabbit = RabbitHarness(request.getfixturevalue("rabbit_server"))
        try:
            yield rabbit
        finally:
            rabbit.close()
        return
    if request.param == "kombu-sentinel":
        sentinel = SentinelHarness(request.getfixturevalue("sentinel_cluster"))
        try:
            yield sentinel
        finally:
            sentinel.close()
        return
    server = RedisServer(tmp_path / "redis")
    server.start()
    kombu = RedisHarness(server, fast_acks=request.param == "kombu-redis")
    try:
        yield kombu
    finally:
        kombu.close()
        server.kill()


def pop(client: redis.Redis, key: str) -> bytes:
    raw = client.rpop(key)
    assert isinstance(raw, bytes), f"nothing on {key}"
    return raw


def msg(lsn: int, target: str, queue: str | None = None) -> TaskMessage:
    return TaskMessage(f"{WAL_ID}-{lsn}-{target}", f"tasks.{target}.run", queue or target,
                       [{"purchase_id": f"p{lsn}", "n": lsn}], {"flag": True})  # fmt: skip


def test_published_tasks_arrive_in_order_on_their_queues(harness: Harness) -> None:
    batch = [msg(1, "warehouse"), msg(1, "finance"), msg(2, "warehouse"), msg(3, "warehouse")]
    harness.publisher.publish(batch)
    harness.publisher.publish([])
    got = harness.fetch("warehouse", 3) + harness.fetch("finance", 1)
    want = [(m.task_id, m.name, m.args, m.kwargs) for m in (batch[0], batch[2], batch[3], batch[1])]
    assert got == want


def test_acks_come_back_in_order_and_whole(harness: Harness) -> None:
    harness.publisher.session()  # connected, so the ack queue exists
    acks = [Ack(WAL_ID, 7, "warehouse", True), Ack(WAL_ID, 3, "finance", False, "Boom('x')")]
    for ack in acks:
        harness.send_ack(ack)
    got: list[Ack] = []
    deadline = time.monotonic() + 5
    while len(got) < 2 and time.monotonic() < deadline:
        got += harness.publisher.drain_acks(0.05)
    assert got == acks


def test_drain_honours_limit_and_timeout(harness: Harness) -> None:
    harness.publisher.session()
    started = time.monotonic()
    assert harness.publisher.drain_acks(0.05) == []
    assert time.monotonic() - started < 2
    for lsn in range(5):
        harness.send_ack(Ack(WAL_ID, lsn, "t", True))
    first = harness.publisher.drain_acks(0.5, limit=2)
    rest = harness.publisher.drain_acks(0.5, limit=10)
    rest += harness.publisher.drain_acks(0.05, limit=10)
    assert [a.lsn for a in first] == [0, 1]
    assert [a.lsn for a in rest] == [2, 3, 4]


def test_acks_of_another_wal_are_not_ours(harness: Harness) -> None:
    harness.publisher.session()
    harness.send_ack(Ack(OTHER_WAL, 1, "warehouse", True))
    assert harness.publisher.drain_acks(0.05) == []


def test_session_is_stable_until_the_broker_restarts(harness: Harness) -> None:
    first = harness.publisher.session()
    assert harness.publisher.session() == first
    harness.publisher.publish([msg(1, "warehouse")])
    harness.restart_broker()
    second = retry(harness.publisher.session)  # a lost connection raises first
    assert second != first
    assert harness.publisher.session() == second
    harness.publisher.publish([msg(2, "warehouse")])
    assert [f[0] for f in harness.fetch("warehouse", 1)] == [msg(2, "warehouse").task_id]


def test_a_message_that_cannot_be_encoded_is_refused_the_others_published(
    harness: Harness,
) -> None:
    bad = TaskMessage(f"{WAL_ID}-2-warehouse", "tasks.warehouse.run", "warehouse", ["\ud800"], {})
    session = harness.publisher.session()
    with pytest.raises(MessageRejectedError) as caught:
        harness.publisher.publish([msg(1, "warehouse"), bad, msg(3, "warehouse")])
    assert list(caught.value.rejected) == [1]
    assert "surrogate" in caught.value.rejected[1]
    assert [f[0] for f in harness.fetch("warehouse", 2)] == [
        msg(1, "warehouse").task_id, msg(3, "warehouse").task_id,
    ]  # fmt: skip
    assert harness.publisher.session() == session  # not a broker outage


@pytest.mark.parametrize("where", ["queue", "routing_key", "exchange"])
def test_a_destination_that_cannot_be_encoded_is_refused_the_others_published(
    harness: Harness, where: str
) -> None:
    """A queue, routing key or exchange name with a lone surrogate (a record of an older
    release, or appended without send's checks) is that message's refusal, by position,
    never a failure of the whole batch retried for ever."""
    odd: dict[str, Any] = {"queue": "warehouse", where: "w\ud800"}
    bad = TaskMessage(f"{WAL_ID}-2-warehouse", "tasks.warehouse.run", args=[], kwargs={}, **odd)
    harness.publisher.session()
    with pytest.raises(MessageRejectedError) as caught:
        harness.publisher.publish([msg(1, "warehouse"), bad, msg(3, "warehouse")])
    assert list(caught.value.rejected) == [1]
    assert "surrogate" in caught.value.rejected[1]
    assert [f[0] for f in harness.fetch("warehouse", 2)] == [
        msg(1, "warehouse").task_id, msg(3, "warehouse").task_id,
    ]  # fmt: skip


def test_a_queue_the_broker_refuses_is_not_an_outage(harness: Harness) -> None:
    """A queue named like a key that is not a list (kombu's ``unacked`` hash): the broker
    refuses those messages only; the connection, its session and the rest are fine."""
    harness.make_wrong_type("unacked")
    session = harness.publisher.session()
    with pytest.raises(MessageRejectedError):
        harness.publisher.publish([msg(1, "warehouse"), msg(2, "x", queue="unacked"),
                                   msg(3, "warehouse")])  # fmt: skip
    assert [f[0] for f in harness.fetch("warehouse", 2)] == [
        msg(1, "warehouse").task_id, msg(3, "warehouse").task_id,
    ]  # fmt: skip
    assert harness.publisher.session() == session
    harness.publisher.publish([msg(4, "warehouse")])
    assert [f[0] for f in harness.fetch("warehouse", 1)] == [msg(4, "warehouse").task_id]


def test_acks_name_the_copy_they_confirm(harness: Harness) -> None:
    harness.publisher.session()
    acks = [Ack(WAL_ID, 1, "warehouse", True, copy="0a1b2c3d.17"), Ack(WAL_ID, 2, "f", True)]
    for ack in acks:
        harness.send_ack(ack)
    got: list[Ack] = []
    deadline = time.monotonic() + 5
    while len(got) < 2 and time.monotonic() < deadline:
        got += harness.publisher.drain_acks(0.05)
    assert got == acks


def test_unreachable_broker_raises_then_recovers(harness: Harness) -> None:
    before = harness.publisher.session()
    harness.stop_broker()
    with pytest.raises(BrokerUnavailableError):
        harness.publisher.publish([msg(1, "warehouse")])
    with pytest.raises(BrokerUnavailableError):
        harness.publisher.session()
    with pytest.raises(BrokerUnavailableError):
        harness.publisher.drain_acks(0.01)
    harness.start_broker()
    after = retry(harness.publisher.session)
    if harness.keeps_queues:
        assert after == before  # nothing was lost: nothing to send again
    else:
        assert after != before
    harness.publisher.publish([msg(2, "warehouse")])
    assert [f[0] for f in harness.fetch("warehouse", 1)] == [msg(2, "warehouse").task_id]


def test_an_outage_that_kept_the_queues_keeps_the_session(harness: Harness) -> None:
    """RabbitMQ restarted with its durable queues, a Sentinel failover to a replica in
    sync: what was queued is still there, so the pump must not send it again."""
    before = harness.publisher.session()
    harness.publisher.publish([msg(1, "warehouse")])
    harness.outage_keeping_queues()
    retry(lambda: harness.publisher.publish([msg(2, "warehouse")]))
    assert retry(harness.publisher.session) == before
    got = [f[0] for f in harness.fetch("warehouse", 2)]
    assert got == [msg(1, "warehouse").task_id, msg(2, "warehouse").task_id]


def retry(call: Any, seconds: float = 30) -> Any:
    """``call()`` until it stops raising BrokerUnavailableError (a broker still starting)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return call()
        except BrokerUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_messages_are_what_celery_itself_would_send(tmp_path: Path) -> None:
    """Same headers, properties and body layout as apply_async (protocol 2, JSON)."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    kombu = RedisHarness(server, fast_acks=True)
    try:
        ours = msg(5, "warehouse")
        kombu.publisher.publish([ours])
        kombu.app.send_task(ours.name, ours.args, ours.kwargs, task_id=ours.task_id,
                            queue="celery-made")  # fmt: skip
        client = server.client()
        mine = json.loads(pop(client, "warehouse"))
        theirs = json.loads(pop(client, "celery-made"))
    finally:
        kombu.close()
        server.kill()
    assert set(mine["headers"]) == set(theirs["headers"]) | {COPY_HEADER}
    for key in ("lang", "task", "id", "root_id", "parent_id", "group", "eta", "retries"):
        assert mine["headers"][key] == theirs["headers"][key], key
    assert set(mine["properties"]) == set(theirs["properties"])
    assert mine["properties"]["correlation_id"] == ours.task_id
    assert mine["properties"]["delivery_mode"] == theirs["properties"]["delivery_mode"]
    assert mine["content-type"] == theirs["content-type"] == "application/json"
    assert mine["content-encoding"] == theirs["content-encoding"] == "utf-8"
    body = json.loads(base64.b64decode(mine["body"]))
    assert body == json.loads(base64.b64decode(theirs["body"]))
    assert body[:2] == [ours.args, ours.kwargs]


def test_options_are_carried_as_celery_carries_them(tmp_path: Path) -> None:
    """expires (ISO 8601), priority and the caller's headers, as apply_async sends them;
    the caller's headers never override the protocol's."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    kombu = RedisHarness(server, fast_acks=True)
    expires = 1_900_000_000.5
    try:
        base = msg(6, "warehouse")
        forged = {"tenant": "acme", "id": "forged", COPY_HEADER: "x"}
        ours = TaskMessage(base.task_id, base.name, "warehouse", base.args, base.kwargs,
                           copy="run1.9", expires=expires, priority=7, headers=forged)  # fmt: skip
        kombu.publisher.publish([ours])
        kombu.app.send_task(ours.name, ours.args, ours.kwargs, task_id=ours.task_id,
                            queue="celery-made", priority=7, headers={"tenant": "acme"},
                            expires=datetime.fromtimestamp(expires, tz=UTC))  # fmt: skip
        client = server.client()
        # Redis keeps one list per priority step: 7 lands on the ":6" list of each queue.
        (mine_key,) = [k.decode() for k in client.keys("warehouse*") if isinstance(k, bytes)]
        (theirs_key,) = [k.decode() for k in client.keys("celery-made*") if isinstance(k, bytes)]
        assert mine_key.removeprefix("warehouse") == theirs_key.removeprefix("celery-made")
        mine = json.loads(pop(client, mine_key))
        theirs = json.loads(pop(client, theirs_key))
    finally:
        kombu.close()
        server.kill()
    h, t = mine["headers"], theirs["headers"]
    assert datetime.fromisoformat(h["expires"]) == datetime.fromisoformat(t["expires"])
    assert h["tenant"] == t["tenant"] == "acme"
    assert h["id"] == ours.task_id and h[COPY_HEADER] == "run1.9"
    assert mine["properties"]["priority"] == theirs["properties"]["priority"] == 7


def test_redis_drain_also_accepts_acks_sent_as_kombu_messages(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    kombu = RedisHarness(server, fast_acks=True)
    try:
        kombu.publisher.session()
        send_ack(kombu.app, Ack(WAL_ID, 1, "warehouse", True), raw=False)
        send_ack(kombu.app, Ack(WAL_ID, 2, "warehouse", True), raw=True)
        server.client().lpush(f"walstore.acks.{WAL_ID}", b"not json", b'{"wal_id": 3}')
        got = kombu.publisher.drain_acks(0.05)
    finally:
        kombu.close()
        server.kill()
    assert [a.lsn for a in got] == [1, 2]  # malformed ones are dropped
