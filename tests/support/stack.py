"""Reusable test machinery for the pipeline: a private redis-server and a Stack of real
pump and worker processes, all owned by the test and stopped by PID.

``RedisServer`` (tools.redis_server, the one launcher): start on a free loopback port,
``kill`` (-9), ``restart`` on the same port (empty: no persistence), ``client()``.
``Stack``: the environment of one pipeline (broker, WAL_DIR, LEDGER_URL, small segments)
and helpers to start/stop workers and the pump through the one supervisor
(tools.processes, tools.roles: ready by a ready file or a health check), run
``celery -A worker ...`` commands and read the ledger and the log.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Protocol

from typing_extensions import TypeVar

from tools import roles
from tools.localstack import ROOT, ledger_snapshot, ledger_url_in, pipeline_env, wal_dir_in
from tools.processes import Proc, Processes, celery_bin, free_port, wait_until
from tools.redis_server import RedisServer
from walstore import Options, Status, Wal

__all__ = ["CELERY", "ROOT", "RedisServer", "Stack", "free_port", "wait_until"]

CELERY = celery_bin()
SMALL_LOG = {"WAL_SEGMENT_BYTES": "16384", "WAL_SYNC": "none"}


class BrokerAddress(Protocol):
    @property
    def url(self) -> str: ...


# The broker: a RedisServer unless said otherwise (``tools.brokers`` for the fault suite,
# whose transport options come with ``overrides``).
B = TypeVar("B", bound=BrokerAddress, default=RedisServer)


@dataclass
class Stack(Generic[B]):
    """One pipeline's environment and the processes a test started in it (their logs in
    ``tmp/logs``)."""

    tmp: Path
    redis: B
    overrides: Mapping[str, str] = field(default_factory=dict)
    processes: Processes = field(init=False)

    def __post_init__(self) -> None:
        self.processes = Processes(self.tmp / "logs", ROOT, self.env)

    @property
    def procs(self) -> list[Proc]:
        """Every process started, in order."""
        return self.processes.started

    @property
    def wal_dir(self) -> Path:
        return wal_dir_in(self.tmp)

    @property
    def ledger_url(self) -> str:
        return ledger_url_in(self.tmp)

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        return pipeline_env(self.redis.url, self.tmp, SMALL_LOG, self.overrides, extra)

    def spawn(self, name: str, argv: list[str], env: Mapping[str, str] | None = None) -> Proc:
        return self.processes.spawn(name, argv, env)

    def log_of(self, proc: Proc) -> str:
        return proc.log_text()

    def start_worker(
        self,
        concurrency: int = 1,
        env: Mapping[str, str] | None = None,
        queues: str = roles.WORKER_QUEUES,
        app: str = "worker",
        wait: bool = True,
    ) -> Proc:
        """A worker of ``app`` (-A); ``wait``: until it consumes (its ready file)."""
        name = f"w{len(self.procs) + 1}"
        return roles.start_worker(self.processes, name, concurrency, queues=queues, app=app,
                                  env=env, wait=wait)  # fmt: skip

    def start_pump(self, env: Mapping[str, str] | None = None, app: str = "worker") -> Proc:
        """The pump of ``app``, once its metrics answer (``PUMP_METRICS_PORT`` of ``env``)."""
        return roles.start_pump(self.processes, app=app, env=env)

    def celery(
        self, *args: str, env: Mapping[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [CELERY, "-A", "worker", *args],
            cwd=ROOT,
            env=self.env(env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def stop(self, proc: Proc, sig: int = signal.SIGTERM) -> int:
        return proc.stop(sig)

    def close(self) -> None:
        self.processes.stop_all(timeout=10)

    # ------------------------------------------------------------------ observations
    def ledger(self) -> dict[str, dict[str, int]]:
        return ledger_snapshot(self.ledger_url)

    def wal_status(self) -> Status:
        with Wal.open(self.wal_dir, Options.from_env(self.env())) as wal:
            return wal.status()

    def produce(
        self, processes: int, per_process: int, prefix: str = "p", skus: str = "sku-1"
    ) -> list[str]:
        """Record purchases from ``processes`` concurrent producer processes; returns ids."""
        code = (
            "import sys\n"
            "from tasks.checkout import record_purchase\n"
            "prefix, n, sku = sys.argv[1], int(sys.argv[2]), sys.argv[3]\n"
            "for i in range(n):\n"
            "    record_purchase({'purchase_id': f'{prefix}-{i}', 'customer': 'Ada',\n"
            "        'items': [{'sku': sku, 'qty': 1 + i % 3}], 'total_cents': 100 + i,\n"
            "        'currency': 'EUR'})\n"
        )
        ids: list[str] = []
        running = []
        for p in range(processes):
            name = f"{prefix}{p}"
            argv = [sys.executable, "-c", code, name, str(per_process), skus]
            running.append(self.spawn(f"producer-{name}", argv))
            ids += [f"{name}-{i}" for i in range(per_process)]
        for proc in running:
            assert proc.wait(120) == 0, f"a producer failed:\n{proc.log_text()[-3000:]}"
        return ids
