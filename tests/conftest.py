"""Shared fixtures: a private redis-server per test, a private RabbitMQ node per module
(it takes ~10 s to boot), a Redis Sentinel set per test, and a pipeline Stack (see
stack.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.stack import RedisServer, Stack
from tools.rabbitmq_server import RabbitServer
from tools.sentinel import SentinelCluster


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server on a free loopback port, owned by the test (kill/restart at will)."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def stack(tmp_path: Path, redis_server: RedisServer) -> Iterator[Stack]:
    """The pipeline's environment in tmp_path; every process it started is stopped."""
    pipeline = Stack(tmp_path, redis_server)
    try:
        yield pipeline
    finally:
        pipeline.close()


@pytest.fixture(scope="module")
def rabbit_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitServer]:
    """A private RabbitMQ node on free loopback ports, shared by a module's tests (each
    test uses queues of its own, or restarts it)."""
    server = RabbitServer(tmp_path_factory.mktemp("rabbitmq"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def sentinel_cluster(tmp_path: Path) -> Iterator[SentinelCluster]:
    """A primary, a replica and three sentinels on free loopback ports."""
    cluster = SentinelCluster(tmp_path / "sentinel")
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
