"""Reusable test machinery for the pipeline: a private redis-server and a Stack of real
pump and worker processes, all owned by the test and stopped by PID.

``RedisServer``: start on a free loopback port, ``kill`` (-9), ``restart`` on the same
port (empty: no persistence), ``client()``. ``Stack``: the environment of one pipeline
(broker, WAL_DIR, LEDGER_URL, small segments) and helpers to start/stop workers and the
pump, run ``celery -A worker ...`` commands and read the ledger and the log.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tools.localstack import (
    RedisServer,
    free_port,
    ledger_snapshot,
    ledger_url_in,
    pipeline_env,
    stop_process,
    wait_until,
    wal_dir_in,
    worker_argv,
)
from tools.processes import celery_bin
from walstore import Options, Status, Wal

__all__ = ["CELERY", "RedisServer", "Stack", "free_port", "stop_process", "wait_until"]

ROOT = Path(__file__).resolve().parents[2]
CELERY = celery_bin()


@dataclass
class Stack:
    """One pipeline's environment and the processes a test started in it."""

    tmp: Path
    redis: RedisServer
    overrides: Mapping[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: dict[int, Path] = field(default_factory=dict)
    _n: int = 0

    @property
    def wal_dir(self) -> Path:
        return wal_dir_in(self.tmp)

    @property
    def ledger_url(self) -> str:
        return ledger_url_in(self.tmp)

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        small = {"WAL_SEGMENT_BYTES": "16384", "WAL_SYNC": "none"}
        return pipeline_env(self.redis.url, self.tmp, small, self.overrides, extra)

    def spawn(
        self, name: str, argv: list[str], env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        self._n += 1
        path = self.tmp / f"{self._n:02d}-{name}.log"
        with open(path, "wb") as log:
            proc = subprocess.Popen(
                argv, cwd=ROOT, env=self.env(env), stdout=log, stderr=subprocess.STDOUT
            )
        self.procs.append(proc)
        self.logs[proc.pid] = path
        return proc

    def log_of(self, proc: subprocess.Popen[bytes]) -> str:
        return self.logs[proc.pid].read_text(errors="replace")

    def start_worker(
        self,
        concurrency: int = 1,
        env: Mapping[str, str] | None = None,
        queues: str = "warehouse,finance",
        app: str = "worker",
        wait: bool = True,
    ) -> subprocess.Popen[bytes]:
        """A worker of ``app`` (-A); ``wait``: until it is ready (connected)."""
        name = f"w{self._n + 1}"
        proc = self.spawn(name, worker_argv(f"{name}@%h", concurrency, queues, app=app), env)
        if wait:
            wait_until(f"worker {name} ready", lambda: self._ready(proc, " ready."), 60)
        return proc

    def start_pump(
        self, env: Mapping[str, str] | None = None, app: str = "worker"
    ) -> subprocess.Popen[bytes]:
        proc = self.spawn("pump", [CELERY, "-A", app, "pump"], env)
        wait_until("pump started", lambda: self._ready(proc, "resuming at LSN"), 60)
        return proc

    def _ready(self, proc: subprocess.Popen[bytes], marker: str) -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"process exited {proc.returncode}:\n{self.log_of(proc)[-3000:]}")
        return marker in self.log_of(proc)

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

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
        return stop_process(proc, sig)

    def close(self) -> None:
        for proc in reversed(self.procs):
            stop_process(proc, signal.SIGTERM, timeout=10)

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
            running.append(
                subprocess.Popen(
                    [sys.executable, "-c", code, name, str(per_process), skus],
                    cwd=ROOT,
                    env=self.env(),
                )
            )
            ids += [f"{name}-{i}" for i in range(per_process)]
        for proc in running:
            assert proc.wait(120) == 0, "a producer failed"
        return ids
