"""A private RabbitMQ node for the tests, the chaos command and the benchmarks: free
loopback ports, its own Erlang node name, epmd, cookie and data directory, so that it
never meets the machine's own node (5672, epmd 4369), and kill -9 hits only it.

Unlike ``tools.redis_server``'s Redis, the node keeps its data (durable queues and
persistent messages in ``mnesia/``) across ``kill``/``start``, as RabbitMQ is deployed;
``restart(wipe=True)`` gives a node that lost everything (a replaced node).

Processes (``tools.processes.spawn``): a private ``epmd -port N`` (in the foreground:
ours to stop) and ``rabbitmq-server``'s script, which runs the Erlang VM as its child;
both lead a process group of their own, and ``kill``/``pause`` signal the whole group
(the VM and its helpers ``erl_child_setup`` and ``inet_gethost``), found by the PID we
started. Ready when an AMQP handshake succeeds (its health check).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import amqp

from tools.processes import Proc, StackError, free_port, spawn

RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # the script, not the su wrapper
START_TIMEOUT = 90.0  # a cold node boots in 5-15 s on a busy 2-core machine


def find_rabbitmq_server() -> str:
    """``RABBITMQ_SERVER`` if set, else the Debian package's script."""
    binary = os.environ.get("RABBITMQ_SERVER") or RABBITMQ_SERVER
    if os.access(binary, os.X_OK) and shutil.which("epmd"):
        return binary
    raise StackError(
        "rabbitmq-server not found: install the rabbitmq-server package (it brings "
        "epmd), or set RABBITMQ_SERVER to the path of its rabbitmq-server script"
    )


def _config(port: int, binds: tuple[str, ...], log: Path) -> str:
    lines = [f"listeners.tcp.{i + 1} = {addr}:{port}" for i, addr in enumerate(binds)]
    lines += [
        f"log.file = {log}",
        "log.file.level = info",
        "log.console = false",
        # Tests fill a few MB: the default 50 MB free-disk alarm would only block them
        # on a nearly full /tmp, which is not what they test.
        "disk_free_limit.absolute = 1MB",
    ]
    if binds != ("127.0.0.1",):
        # guest may only log in over loopback by default; the multi-host test's hosts
        # come over veth addresses of this machine.
        lines.append("loopback_users = none")
    return "\n".join(lines) + "\n"


class RabbitServer:
    """A private RabbitMQ node in ``workdir``: ``start``, ``kill`` (-9), ``stop``,
    ``restart`` (data kept, or ``wipe=True``), ``pause``/``resume`` (SIGSTOP/SIGCONT),
    ``depth(queue)``. ``binds``: the addresses it listens on (loopback by default)."""

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *,
        session: bool = True,
        binds: tuple[str, ...] = ("127.0.0.1",),
    ) -> None:
        self.workdir = workdir.resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.binds = binds
        self.session = session  # always a group of its own: the VM is a child of a script
        self.node = f"walrelay{self.port}@localhost"
        self.proc: Proc | None = None
        self.epmd: Proc | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def url_at(self, host: str) -> str:
        """The URL through another of its addresses (``binds``)."""
        return f"amqp://guest:guest@{host}:{self.port}//"

    @property
    def transport_options(self) -> dict[str, object]:
        return {}

    def env(self) -> dict[str, str]:
        """The node's environment: everything private to ``workdir``."""
        w = self.workdir
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(w),  # its own .erlang.cookie
            RABBITMQ_CONF_ENV_FILE=str(w / "rabbitmq-env.conf"),  # not /etc/rabbitmq's
            RABBITMQ_CONFIG_FILE=str(w / "rabbitmq.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(w / "enabled_plugins"),  # none: no management
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(w / "mnesia"),
            RABBITMQ_LOG_BASE=str(w / "log"),
            RABBITMQ_PID_FILE=str(w / "node.pid"),
            ERL_EPMD_PORT=str(self.epmd_port),
            ERL_EPMD_ADDRESS="127.0.0.1",
            ERL_CRASH_DUMP=str(w / "erl_crash.dump"),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        return env

    def _write_config(self) -> None:
        (self.workdir / "log").mkdir(exist_ok=True)
        (self.workdir / "rabbitmq-env.conf").write_text("")
        (self.workdir / "enabled_plugins").write_text("[].\n")
        log = self.workdir / "log" / "node.log"
        (self.workdir / "rabbitmq.conf").write_text(_config(self.port, self.binds, log))

    def _start_epmd(self) -> None:
        if self.epmd is not None and self.epmd.alive:
            return
        argv = ["epmd", "-port", str(self.epmd_port), "-address", "127.0.0.1"]
        self.epmd = spawn("epmd", argv, self.workdir / "epmd.log", cwd=self.workdir,
                          env=self.env())  # fmt: skip

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the node and wait until it takes AMQP connections (after it booted its
        applications and recovered its queues)."""
        binary = find_rabbitmq_server()
        self._write_config()
        self._start_epmd()
        self.starts += 1
        log = self.workdir / f"rabbitmq-{self.starts}.log"
        self.proc = spawn("rabbitmq", [binary], log, cwd=self.workdir, env=self.env())
        try:
            self.proc.wait_ready(f"RabbitMQ to answer on port {self.port}", self.ping, timeout)
        except StackError:
            self.kill()
            raise

    def ping(self) -> bool:
        """True if an AMQP handshake succeeds (its health check)."""
        conn = amqp.Connection(f"127.0.0.1:{self.port}", connect_timeout=2)
        try:
            conn.connect()
            return True
        except Exception:  # refused, reset mid-handshake, still booting: not ready
            return False
        finally:
            with contextlib.suppress(Exception):
                conn.collect()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.alive

    def _signal_group(self, sig: int) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """kill -9 of the node (its group: the VM and helpers); durable data stays."""
        if self.proc is not None:
            self._signal_group(signal.SIGKILL)
            self.proc.stop(signal.SIGKILL)
            self.proc = None

    def stop(self) -> None:
        """A clean shutdown (SIGTERM: the script stops the node), then its epmd."""
        if self.proc is not None:
            self._signal_group(signal.SIGCONT)  # a paused node cannot act on SIGTERM
            self.proc.stop(signal.SIGTERM, timeout=30)  # then KILL of what is left
            self.proc = None
        if self.epmd is not None:
            self.epmd.stop()
            self.epmd = None

    def wipe(self) -> None:
        """Delete the node's data (it must be stopped): the next start is a new node."""
        if self.running:
            raise StackError("wipe a stopped node only")
        shutil.rmtree(self.workdir / "mnesia", ignore_errors=True)

    def restart(self, *, wipe: bool = False) -> None:
        """kill -9 and start again on the same port; ``wipe``: as a new, empty node."""
        self.kill()
        if wipe:
            self.wipe()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: connections stay open, nothing answers (a hung host)."""
        self._signal_group(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_group(signal.SIGCONT)

    def depth(self, queue: str) -> int:
        """Messages ready in ``queue`` (0 if it does not exist)."""
        conn = amqp.Connection(f"127.0.0.1:{self.port}", connect_timeout=5)
        conn.connect()
        try:
            channel = conn.channel()
            try:
                declared: Any = channel.queue_declare(queue, passive=True)
                return int(declared.message_count)
            except amqp.exceptions.NotFound:
                return 0
        finally:
            with contextlib.suppress(Exception):
                conn.close()
