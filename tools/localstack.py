"""A local stack on embedded defaults, supervised from one process.

A private broker on free loopback ports (``tools.brokers``: a ``redis-server`` without
persistence by default, a RabbitMQ node or a Redis Sentinel set), Celery workers
(``celery -A worker worker -Q warehouse,finance``), the pump (``celery -A worker pump``)
and, on request, the web app (``uvicorn tasks.web:app``) and Flower, all sharing one work
directory: the WAL, the SQLite ledger and one log file per process start under ``logs/``.

Processes start through the one supervisor (``tools.processes.Processes``) and the one
Redis launcher (``tools.redis_server``), as ``tools.roles`` starts each role and knows
it ready (a health check or a ready file). Each process runs in a session of its own, so
a Ctrl-C in the terminal reaches only the supervisor, which then stops them in order: by
PID, TERM then KILL, then whatever is left of the process group (pool children of a
worker whose main process was killed, uvicorn's workers). ``kill_*``/``restart_*`` exist
for every role: the chaos command and the demo inject their faults through them. Like a
service manager with a restart policy (docker-compose's ``restart: unless-stopped``),
``supervise`` restarts a role whose process exited without being asked to, and records
it in ``crashes``.

Used by ``python -m tools.demo`` and ``python -m tools.chaos``; the tests' ``Stack``
(tests/support/stack.py) shares its environment and the same roles.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from tasks.ledger import Ledger
from tools import roles
from tools.brokers import Broker, make_broker
from tools.processes import (
    START_TIMEOUT,
    Proc,
    Processes,
    StackError,
    children_of,
    process_state,
    processes_mentioning,
    signals_ignored,
)
from walstore.inspect import Snapshot, snapshot

__all__ = ["ROOT", "Crash", "LocalStack", "ledger_snapshot", "pipeline_env"]

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]


def wal_dir_in(workdir: Path) -> Path:
    return workdir / "wal"


def ledger_url_in(workdir: Path) -> str:
    return f"sqlite:///{workdir / 'ledger.sqlite3'}"


def pipeline_env(
    broker_url: str, workdir: Path, *layers: Mapping[str, str] | None
) -> dict[str, str]:
    """The environment of a pipeline's processes: the caller's, then the broker, the log
    and the ledger in ``workdir``, then each of ``layers`` in turn (later ones win)."""
    env = dict(os.environ)
    env.update(
        CELERY_BROKER_URL=broker_url,
        WAL_DIR=str(wal_dir_in(workdir)),
        LEDGER_URL=ledger_url_in(workdir),
        PYTHONUNBUFFERED="1",
    )
    for layer in layers:
        env.update(layer or {})
    return env


def ledger_snapshot(url: str) -> dict[str, dict[str, int]]:
    """``Ledger.snapshot`` of the ledger at ``url``, closed again."""
    book = Ledger(url)
    try:
        return book.snapshot()
    finally:
        book.close()


@dataclass(frozen=True)
class Crash:
    at: float  # time.monotonic() when it was noticed
    role: str
    returncode: int | None
    log: Path


class LocalStack:
    """The processes of one local pipeline in ``workdir``; a context manager that stops
    everything it started on exit, whatever the exit."""

    def __init__(
        self,
        workdir: Path,
        *,
        workers: int = 2,
        concurrency: int = 2,
        web_workers: int = 2,
        env: Mapping[str, str] | None = None,
        broker: str = "redis",
    ) -> None:
        self.workdir = workdir.resolve()
        self.logdir = self.workdir / "logs"
        cwd = ROOT if (ROOT / "worker.py").exists() else self.workdir
        self.processes = Processes(self.logdir, cwd, self.env)
        self.broker: Broker = make_broker(broker, self.workdir / broker, session=True)
        self.workers: list[Proc | None] = [None] * workers
        self.concurrency = concurrency
        self.web_workers = web_workers
        self.extra_env = dict(env or {})
        self.pump: Proc | None = None
        self.web: Proc | None = None
        self.flower: Proc | None = None
        self.pump_port = 0  # its metrics; 0 until a free one is picked, restarts reuse it
        self.web_port = 0  # likewise
        self.flower_port = 0
        self.crashes: list[Crash] = []
        self._lock = threading.RLock()  # one role change at a time (faults vs. supervisor)
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

    # ---------------------------------------------------------------- environment
    @property
    def wal_dir(self) -> Path:
        return wal_dir_in(self.workdir)

    @property
    def ledger_url(self) -> str:
        return ledger_url_in(self.workdir)

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    @property
    def flower_url(self) -> str:
        return f"http://127.0.0.1:{self.flower_port}"

    @property
    def metrics_url(self) -> str:
        """The pump's Prometheus metrics."""
        return f"http://127.0.0.1:{self.pump_port}/metrics"

    @property
    def started(self) -> list[Proc]:
        """Every process start, in order (killed ones too)."""
        return self.processes.started

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment of every process: see ``pipeline_env``."""
        return pipeline_env(self.broker.url, self.workdir, self.broker.env(), self.extra_env,
                            extra)  # fmt: skip

    def spawn(self, role: str, argv: list[str], env: Mapping[str, str] | None = None) -> Proc:
        """Start ``argv`` in its own session, output to ``logs/NN-role.log``."""
        return self.processes.spawn(role, argv, env)

    # ---------------------------------------------------------------- roles
    def start(self, *, web: bool = False, flower: bool = False) -> None:
        """Start the broker, the workers, the pump and, if asked, the web app and Flower;
        return once every one of them is ready."""
        self.broker.start()
        started = [self.start_worker(i, wait=False) for i in range(len(self.workers))]
        self.start_pump()
        if web:
            self.start_web()
        if flower:
            self.start_flower()
        for proc in started:
            roles.wait_worker(proc)

    def start_worker(self, index: int, *, wait: bool = True) -> Proc:
        with self._lock:
            name = f"worker{index + 1}"
            proc = roles.start_worker(self.processes, name, self.concurrency, wait=False)
            self.workers[index] = proc
            if wait:
                roles.wait_worker(proc)
            return proc

    def start_pump(self) -> Proc:
        """The pump, ready once its metrics answer (on a free port; restarts reuse it)."""
        with self._lock:
            self.pump = roles.start_pump(self.processes, port=self.pump_port)
            self.pump_port = self.pump.port
            return self.pump

    def start_web(self) -> str:
        """uvicorn with ``web_workers`` workers on a free port (restarts reuse it), ready
        once /healthz answers."""
        with self._lock:
            self.web = roles.start_web(self.processes, self.workdir / "prometheus",
                                       port=self.web_port, workers=self.web_workers)  # fmt: skip
            self.web_port = self.web.port
            return self.web_url

    def start_flower(self) -> str:
        with self._lock:
            self.flower = roles.start_flower(self.processes, port=self.flower_port)
            self.flower_port = self.flower.port
            return self.flower_url

    # ---------------------------------------------------------------- faults
    def kill_pump(self) -> None:
        with self._lock:
            if self.pump is not None:
                self.pump.stop(signal.SIGKILL)

    def restart_pump(self) -> Proc:
        with self._lock:
            self.kill_pump()
            return self.start_pump()

    def kill_worker(self, index: int) -> None:
        """SIGKILL the worker's main process; then, as a service manager does once the
        main process is gone, SIGKILL what is left of its group (its pool)."""
        with self._lock:
            proc = self.workers[index]
            if proc is not None:
                proc.stop(signal.SIGKILL)

    def restart_worker(self, index: int) -> Proc:
        with self._lock:
            self.kill_worker(index)
            return self.start_worker(index)

    def pool_children(self, index: int) -> list[int]:
        proc = self.workers[index]
        return children_of(proc.pid) if proc is not None and proc.alive else []

    # ---------------------------------------------------------------- supervision
    def supervise(self) -> list[Crash]:
        """Restart every role whose process exited unasked; returns those crashes."""
        found: list[Crash] = []
        with self._lock:
            for role, proc, restart in self._roles():
                if proc is None or proc.alive or proc.expected or self._stopping.is_set():
                    continue
                proc.expected = True  # handled: never counted twice
                crash = Crash(time.monotonic(), role, proc.popen.returncode, proc.log)
                found.append(crash)
                self.crashes.append(crash)
                log.warning("%s exited unasked (code %s); restarting it", role, crash.returncode)
                try:
                    restart()
                except StackError as exc:  # tried again on the next round
                    log.error("could not restart %s: %s", role, exc)
        return found

    def _roles(self) -> list[tuple[str, Proc | None, Callable[[], object]]]:
        roles: list[tuple[str, Proc | None, Callable[[], object]]] = [
            (f"worker{i + 1}", p, partial(self.start_worker, i)) for i, p in enumerate(self.workers)
        ]
        roles += [("pump", self.pump, self.start_pump), ("web", self.web, self.start_web),
                  ("flower", self.flower, self.start_flower)]  # fmt: skip
        return roles

    def start_supervisor(self, interval: float = 0.5) -> None:
        """Call ``supervise`` every ``interval`` s in a thread, until ``stop``."""

        def loop() -> None:
            while not self._stopping.wait(interval):
                self.supervise()

        self._supervisor = threading.Thread(target=loop, name="supervisor", daemon=True)
        self._supervisor.start()

    # ---------------------------------------------------------------- observations
    def wal(self) -> Snapshot:
        """The log's status, read-only (the stack's processes own the log)."""
        return snapshot(str(self.wal_dir))

    def ledger(self) -> dict[str, dict[str, int]]:
        return ledger_snapshot(self.ledger_url)

    def leftovers(self) -> list[int]:
        """PIDs of anything this stack started that is still alive: its processes, their
        groups, and any process naming the work dir (in WAL_DIR, say)."""
        pids = set(self.processes.leftovers())
        pids.update(p for p in self.broker.pids() if process_state(p) not in (None, "Z"))
        pids.update(processes_mentioning(str(self.workdir)))
        return sorted(pids)

    # ---------------------------------------------------------------- shutdown
    def stop(self) -> None:
        """Stop everything, front to back, the broker last; each by PID, TERM then KILL.
        Ctrl-C and SIGTERM are ignored meanwhile: the stop is bounded anyway."""
        self._stopping.set()
        with signals_ignored():
            if self._supervisor is not None:
                self._supervisor.join(START_TIMEOUT + 5)
            with self._lock:
                self.processes.stop_all()
                self.broker.resume()
                self.broker.stop()

    def __enter__(self) -> LocalStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
