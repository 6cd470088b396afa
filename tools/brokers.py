"""One interface over the private brokers the tests, the chaos command and the
benchmarks start: Redis (``tools.redis_server``), RabbitMQ (``tools.rabbitmq_server``)
and a Redis Sentinel set (``tools.sentinel``), so that one fault suite runs against each.

The faults, in each broker's own terms:

- ``crash``: Redis: kill -9 (its data is gone). RabbitMQ: kill -9 of the node (durable
  data kept). Sentinel: kill -9 of the primary, returning once the replica took over.
- ``recover``: Redis: started again, empty. RabbitMQ: started again, queues recovered.
  Sentinel: the old primary back, as a replica.
- ``lose_everything``: Redis: kill -9 and start empty. RabbitMQ: kill -9, wipe, start
  (a new node). Sentinel: both data nodes killed and started empty.
- ``pause``: SIGSTOP of the server (a hung host); for Sentinel of the primary, which the
  sentinels then fail over.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Protocol

from tools.rabbitmq_server import RabbitServer
from tools.redis_server import RedisServer
from tools.sentinel import Node, SentinelCluster

KINDS = ("redis", "rabbitmq", "sentinel")


class Broker(Protocol):
    kind: str
    # True if a crash and recovery keep what was queued (RabbitMQ's durable queues,
    # Sentinel's replica), False if the broker comes back empty (Redis, no persistence).
    keeps_queues: bool
    # True if ``crash`` returns with the broker serving again (Sentinel's failover);
    # False if it stays down until ``recover``.
    fails_over: bool

    @property
    def url(self) -> str: ...
    def env(self) -> dict[str, str]:
        """CELERY_BROKER_URL and BROKER_TRANSPORT_OPTIONS for the pipeline's processes."""

    @property
    def running(self) -> bool: ...
    def pids(self) -> list[int]:
        """Processes serving it now (to tell them apart from leftovers)."""

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def crash(self) -> None: ...
    def recover(self) -> None: ...
    def lose_everything(self) -> None: ...
    def down(self) -> None:
        """Nothing serves (kill -9 of every data node) until ``up``."""

    def up(self) -> None: ...
    def heal(self) -> None:
        """Whatever a fault left stopped or dead runs again (a supervisor's restart)."""

    def pause(self) -> None:
        """SIGSTOP (a hung host); a broker that fails over returns once it did."""

    def resume(self) -> None: ...
    def kill_paused(self) -> None:
        """kill -9 of what ``pause`` stopped (it stays down until ``heal``)."""

    def depth(self, queue: str) -> int:
        """Messages waiting in ``queue``."""


def _env(url: str, options: dict[str, object]) -> dict[str, str]:
    return {"CELERY_BROKER_URL": url, "BROKER_TRANSPORT_OPTIONS": json.dumps(options)}


class _OneServer:
    """What a broker of one server process does to it (Redis, RabbitMQ): each subclass
    sets ``server`` and says how it stops, loses everything and counts a queue."""

    server: RedisServer | RabbitServer

    @property
    def url(self) -> str:
        return self.server.url

    def env(self) -> dict[str, str]:
        return _env(self.url, {})

    @property
    def running(self) -> bool:
        return self.server.running

    def start(self) -> None:
        self.server.start()

    def crash(self) -> None:
        self.server.kill()

    def recover(self) -> None:
        self.server.start()

    def down(self) -> None:
        self.server.kill()

    def up(self) -> None:
        self.server.start()

    def heal(self) -> None:
        self.server.resume()
        if not self.server.running:
            self.server.start()

    def pause(self) -> None:
        self.server.pause()

    def resume(self) -> None:
        self.server.resume()

    def kill_paused(self) -> None:
        self.server.kill()


class RedisBroker(_OneServer):
    kind = "redis"
    keeps_queues = False
    fails_over = False

    def __init__(self, workdir: Path, *, session: bool = False) -> None:
        self.server: RedisServer = RedisServer(workdir, session=session)

    def pids(self) -> list[int]:
        return self.server.proc.leftovers() if self.server.proc is not None else []

    def stop(self) -> None:
        self.server.kill()

    def lose_everything(self) -> None:
        self.server.restart()

    def depth(self, queue: str) -> int:
        return int(self.server.client().llen(queue))


class RabbitBroker(_OneServer):
    kind = "rabbitmq"
    keeps_queues = True
    fails_over = False

    def __init__(
        self, workdir: Path, *, session: bool = True, binds: tuple[str, ...] = ("127.0.0.1",)
    ) -> None:
        self.server: RabbitServer = RabbitServer(workdir, session=session, binds=binds)

    def pids(self) -> list[int]:
        return [pid for p in (self.server.proc, self.server.epmd) if p is not None
                for pid in p.leftovers()]  # fmt: skip

    def stop(self) -> None:
        self.server.stop()

    def lose_everything(self) -> None:
        self.server.restart(wipe=True)

    def depth(self, queue: str) -> int:
        return self.server.depth(queue)


class SentinelBroker:
    kind = "sentinel"
    keeps_queues = True
    fails_over = True

    def __init__(self, workdir: Path, *, session: bool = True) -> None:
        self.cluster = SentinelCluster(workdir)
        self.crashed: list[Node] = []  # killed data nodes, for ``recover``
        self.paused: Node | None = None
        self._primary: Node | None = None  # the primary when ``down`` was called

    @property
    def url(self) -> str:
        return self.cluster.url

    def env(self) -> dict[str, str]:
        return _env(self.url, self.cluster.transport_options)

    @property
    def running(self) -> bool:
        return any(n.running for n in self.cluster.nodes)

    def pids(self) -> list[int]:
        nodes = [*self.cluster.nodes, *self.cluster.sentinels]
        return [pid for n in nodes if n.proc is not None for pid in n.proc.leftovers()]

    def start(self) -> None:
        self.cluster.start()

    def stop(self) -> None:
        self.cluster.stop()

    def crash(self) -> None:
        """kill -9 of the primary; returns once a replica took over (a few seconds)."""
        old = self.cluster.kill_primary()
        self.crashed.append(old)
        self.cluster.wait_failover(old)

    def recover(self) -> None:
        while self.crashed:
            self.cluster.start_node(self.crashed.pop(0))
        self.cluster.wait_replicated()

    def lose_everything(self) -> None:
        """Both data nodes killed and started empty (the sentinels keep their view)."""
        self.down()
        self.up()

    def down(self) -> None:
        self.resume()
        self._primary = self.cluster.primary()
        self.cluster.kill()
        self.crashed.clear()

    def up(self) -> None:
        """Both data nodes started empty: first the one the sentinels call primary."""
        primary = self._primary or self.cluster.primary()
        primary.start()
        for node in self.cluster.nodes:
            if node is not primary:
                node.start(["--replicaof", "127.0.0.1", str(primary.port)])
        self.cluster.wait_replicated()

    def heal(self) -> None:
        self.resume()
        stopped = [n for n in self.cluster.nodes if not n.running]
        if len(stopped) == len(self.cluster.nodes):
            self.up()
            return
        for node in stopped:
            self.cluster.start_node(node)
        for sentinel in self.cluster.sentinels:
            if not sentinel.running:
                sentinel.start()
        self.crashed.clear()
        self.cluster.wait_replicated()

    def pause(self) -> None:
        """SIGSTOP of the primary; returns once the sentinels failed over (after
        ``DOWN_AFTER_MS`` and an election: a few seconds)."""
        self.paused = self.cluster.primary()
        self.paused.signal(signal.SIGSTOP)
        self.cluster.wait_failover(self.paused)

    def resume(self) -> None:
        if self.paused is not None:
            self.paused.signal(signal.SIGCONT)
            self.paused = None

    def kill_paused(self) -> None:
        if self.paused is not None:
            self.paused.kill()
            self.crashed.append(self.paused)
            self.paused = None

    def depth(self, queue: str) -> int:
        return self.cluster.depth(queue)


def make_broker(kind: str, workdir: Path, *, session: bool = True) -> Broker:
    """A broker of ``kind`` (one of ``KINDS``) in ``workdir``, not started."""
    if kind == "redis":
        return RedisBroker(workdir, session=session)
    if kind == "rabbitmq":
        return RabbitBroker(workdir, session=session)
    if kind == "sentinel":
        return SentinelBroker(workdir, session=session)
    raise ValueError(f"unknown broker {kind!r}: one of {', '.join(KINDS)}")
