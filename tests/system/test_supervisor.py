"""The tooling's one supervisor (tools.processes, tools.roles) and Redis launcher: a process
is ready when a health check or its ready file says so, never because of a line in its
log; a server whose port was taken is started again on another; stopping leaves nothing
running."""

from __future__ import annotations

import http.server
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from tests.support.stack import RedisServer, Stack
from tools import roles
from tools.processes import Processes, ProcessExited, StackError, free_port, group_members

pytestmark = [pytest.mark.slow]


@pytest.mark.timeout(120)
def test_a_worker_is_ready_once_it_consumes_not_before(stack: Stack) -> None:
    stack.redis.kill()  # no broker: the worker starts, logs, and cannot consume
    worker = stack.start_worker(wait=False)
    with pytest.raises(StackError, match="timed out"):
        roles.wait_worker(worker, timeout=8)
    assert worker.alive and not worker.ready_file.exists()
    stack.redis.start()  # same port
    roles.wait_worker(worker)
    # Ready means consuming: it answers a remote-control ping at once.
    app = Celery(broker=stack.redis.url)
    try:
        answers = app.control.ping(destination=[f"{worker.role}@{socket.gethostname()}"],
                                   timeout=5)  # fmt: skip
    finally:
        app.close()
    assert answers and all("ok" in next(iter(a.values())) for a in answers), answers
    assert worker.ready_file.read_text().strip() == str(worker.pid)


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port with a listener on it that never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.mark.timeout(120)
def test_a_pump_whose_port_was_taken_starts_again_on_another(
    stack: Stack, taken_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    ports = iter([taken_port])
    monkeypatch.setattr(roles, "free_port", lambda: next(ports, None) or free_port())
    pump = stack.start_pump()
    first, *_ = stack.procs
    assert first.returncode == 1  # could not bind its metrics port, and said so
    assert "cannot serve metrics" in first.log_text()
    assert pump is stack.procs[-1] and pump.alive and pump.port not in (0, taken_port)
    assert roles.pump_up(pump)


class Impostor(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"not a pump\n")

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.timeout(120)
def test_another_server_on_a_given_port_is_not_taken_for_the_pump(stack: Stack) -> None:
    server = http.server.HTTPServer(("127.0.0.1", 0), Impostor)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(ProcessExited, match="cannot serve metrics"):
            roles.start_pump(stack.processes, port=server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.timeout(60)
def test_stopping_leaves_no_process_of_any_group_behind(tmp_path: Path) -> None:
    procs = Processes(tmp_path / "logs", tmp_path, lambda extra: {"PATH": "/usr/bin:/bin"})
    # A parent that ignores SIGTERM (it is KILLed after the timeout) and a child that
    # would outlive it: both are in its process group.
    script = (
        "import os, signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "os.fork() or time.sleep(300)\n"
        "time.sleep(300)\n"
    )
    stubborn = procs.spawn("stubborn", [sys.executable, "-c", script])
    plain = procs.spawn("plain", ["sleep", "300"])
    stubborn.wait_ready("its child", lambda: len(group_members(stubborn.pid)) == 2)
    procs.stop_all(timeout=1)
    assert procs.leftovers() == []
    assert group_members(stubborn.pid) == [] and group_members(plain.pid) == []
    assert stubborn.returncode == -signal.SIGKILL and plain.returncode == -signal.SIGTERM


@pytest.mark.timeout(60)
def test_redis_is_ready_when_it_answers_and_keeps_its_port_across_restarts(
    tmp_path: Path,
) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        port, run_id = server.port, server.run_id()
        server.restart()  # kill -9 and start again: empty, same port
        assert server.port == port and server.ping() and server.run_id() != run_id
    finally:
        server.kill()
    assert not server.running and not server.ping()
