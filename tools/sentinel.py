"""A private Redis Sentinel set for the tests and the chaos command: a primary, a replica
and three sentinels, all redis-server processes on free loopback ports, no persistence
(as ``tools.redis_server``).

Clients use ``url`` (``sentinel://127.0.0.1:A;sentinel://127.0.0.1:B;...``) with
``transport_options`` (``{"master_name": ...}``): kombu asks the sentinels where the
primary is. ``kill_primary`` is the failover case: the sentinels agree the primary is
down after ``down_after_ms`` and promote the replica; ``start_node`` brings the old
primary back, and the sentinels make it a replica of the new one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from tools.processes import Proc, StackError, free_port, send_signal, spawn
from tools.redis_server import find_redis_server

MASTER_NAME = "walrelay"
DOWN_AFTER_MS = 1000  # sentinels agree a primary is down after this long unanswered
FAILOVER_TIMEOUT_MS = 5000
START_TIMEOUT = 10.0


@dataclass
class Node:
    """One redis-server process of the set (data node or sentinel)."""

    name: str
    port: int
    argv: list[str]
    workdir: Path
    proc: Proc | None = None
    starts: int = 0
    _client: redis.Redis | None = field(default=None, repr=False)

    def start(self, extra: list[str] | None = None) -> None:
        """Start it and wait until it answers PING."""
        self.starts += 1
        log = self.workdir / f"{self.name}-{self.starts}.log"
        self.proc = spawn(self.name, [*self.argv, *(extra or [])], log, cwd=self.workdir,
                          env=os.environ)  # fmt: skip
        try:
            self.proc.wait_ready(f"{self.name} to answer on port {self.port}", self.ping,
                                 START_TIMEOUT)  # fmt: skip
        except StackError:
            self.kill()
            raise

    def ping(self) -> bool:
        with contextlib.suppress(redis.RedisError):
            return bool(self.client().ping())
        return False

    def client(self) -> redis.Redis:
        """One client per node, closed with the process (no socket left to the GC)."""
        if self._client is None:
            self._client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)
        return self._client

    def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.alive

    def kill(self) -> None:
        self._drop_client()
        if self.proc is not None:
            self.proc.stop(signal.SIGKILL)
            self.proc = None

    def stop(self) -> None:
        self._drop_client()
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def signal(self, sig: int) -> None:
        if self.proc is not None:
            send_signal(self.proc.pid, sig)


@dataclass
class SentinelCluster:
    """Two data nodes (``nodes[0]`` starts as the primary) and three sentinels."""

    workdir: Path
    master_name: str = MASTER_NAME
    nodes: list[Node] = field(default_factory=list)
    sentinels: list[Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir = self.workdir.resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        binary = find_redis_server()
        for i in range(2):
            port = free_port()
            argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--dir", str(self.workdir),
                    "--repl-diskless-sync-delay", "0"]  # fmt: skip
            self.nodes.append(Node(f"redis{i}", port, argv, self.workdir))
        for i in range(3):
            port = free_port()
            conf = self.workdir / f"sentinel{i}.conf"  # sentinels rewrite it: their state
            self.sentinels.append(Node(f"sentinel{i}", port, [binary, str(conf), "--sentinel"],
                                       self.workdir))  # fmt: skip

    # ------------------------------------------------------------------ addresses
    @property
    def url(self) -> str:
        return ";".join(f"sentinel://127.0.0.1:{s.port}" for s in self.sentinels)

    @property
    def transport_options(self) -> dict[str, object]:
        return {"master_name": self.master_name}

    def primary(self) -> Node:
        """The node the sentinels name as primary now."""
        for sentinel in self.sentinels:
            with contextlib.suppress(redis.RedisError):
                addr: Any = sentinel.client().sentinel_get_master_addr_by_name(self.master_name)
                if addr:
                    port = int(addr[1])
                    return next(n for n in self.nodes if n.port == port)
        raise StackError("no sentinel names a primary")

    def client(self) -> redis.Redis:
        """A client of the current primary."""
        return self.primary().client()

    # ------------------------------------------------------------------ life
    def start(self) -> None:
        first, second = self.nodes
        first.start()
        second.start(["--replicaof", "127.0.0.1", str(first.port)])
        for i, sentinel in enumerate(self.sentinels):
            conf = self.workdir / f"sentinel{i}.conf"
            conf.write_text(
                f"port {sentinel.port}\nbind 127.0.0.1\ndir {self.workdir}\n"
                f"sentinel monitor {self.master_name} 127.0.0.1 {first.port} 2\n"
                f"sentinel down-after-milliseconds {self.master_name} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {self.master_name} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {self.master_name} 1\n"
            )
            sentinel.start()
        self.wait_replicated()

    def wait_replicated(self, timeout: float = 30) -> None:
        """Until every live replica is in sync with the primary and every sentinel knows
        of a replica."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError, StackError, StopIteration):
                primary = self.primary()
                replicas = [n for n in self.nodes if n is not primary and n.running]
                linked = [r.client().info("replication") for r in replicas]
                known = [s.client().sentinel_slaves(self.master_name) for s in self.sentinels]
                if all(i.get("master_link_status") == "up" for i in linked) and all(known):
                    return
            time.sleep(0.1)
        raise StackError(f"the sentinel set did not settle in {timeout}s (see {self.workdir})")

    def wait_in_sync(self, timeout: float = 10) -> None:
        """Until every live replica has every write the primary has (replication is
        asynchronous: a failover before this may lose the last writes)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError, StackError, StopIteration):
                primary = self.primary()
                offset = int(primary.client().info("replication")["master_repl_offset"])
                replicas = [n for n in self.nodes if n is not primary and n.running]
                done = [int(r.client().info("replication").get("slave_repl_offset", -1))
                        for r in replicas]  # fmt: skip
                if all(d >= offset for d in done):
                    return
            time.sleep(0.05)
        raise StackError(f"replicas not in sync after {timeout}s")

    def kill_primary(self) -> Node:
        """kill -9 the primary: the sentinels fail over to the replica."""
        node = self.primary()
        node.kill()
        return node

    def wait_failover(self, old: Node, timeout: float = 30) -> Node:
        """Until the sentinels name another primary, and it answers as one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError, StackError, StopIteration):
                new = self.primary()
                if new is not old and new.client().info("replication")["role"] == "master":
                    return new
            time.sleep(0.1)
        raise StackError(f"no failover within {timeout}s (see {self.workdir})")

    def start_node(self, node: Node) -> None:
        """Start a stopped data node as a replica of the current primary (the sentinels
        would reconfigure it anyway; starting it so avoids a moment with two primaries)."""
        primary = self.primary()
        if primary is node:
            node.start()  # no failover happened: it is still the primary
        else:
            node.start(["--replicaof", "127.0.0.1", str(primary.port)])

    def kill(self) -> None:
        """kill -9 every data node (the sentinels stay): the broker is gone."""
        for node in self.nodes:
            node.kill()

    def stop(self) -> None:
        for node in [*self.sentinels, *self.nodes]:
            node.stop()

    def depth(self, queue: str) -> int:
        return int(self.client().llen(queue))
