"""Shared fixtures: a private redis-server per test and a pipeline Stack (see stack.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.stack import RedisServer, Stack


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
