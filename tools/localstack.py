"""A local stack on embedded defaults, supervised from one process.

A private ``redis-server`` on a free loopback port (no persistence), Celery workers
(``celery -A worker worker -Q warehouse,finance``), the pump (``celery -A worker pump``)
and, on request, the web app (``uvicorn tasks.web:app``) and Flower, all sharing one work
directory: the WAL, the SQLite ledger and one log file per process start under ``logs/``.

Each process runs in a session of its own, so a Ctrl-C in the terminal reaches only the
supervisor, which then stops them in order: by PID, TERM then KILL, then whatever is left
of the process group (pool children of a worker whose main process was killed, uvicorn's
workers). ``kill_*``/``restart_*`` exist for every role: the chaos command and the demo
inject their faults through them. Like a service manager with a restart policy
(docker-compose's ``restart: unless-stopped``), ``supervise`` restarts a role whose
process exited without being asked to, and records it in ``crashes``.

Used by ``python -m tools.demo``, ``python -m tools.chaos`` and the tests (tests/stack.py
builds on ``RedisServer`` and the helpers of ``tools.processes``).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from tasks.ledger import Ledger
from tools.processes import (
    Proc,
    StackError,
    celery_bin,
    children_of,
    free_port,
    http_ok,
    processes_mentioning,
    signals_ignored,
    spawn,
    stop_process,
    wait_until,
)
from tools.redis_server import RedisServer
from walstore.inspect import Snapshot, snapshot

__all__ = [
    "Crash",
    "LocalStack",
    "RedisServer",
    "StackError",
    "free_port",
    "ledger_snapshot",
    "pipeline_env",
    "stop_process",
    "wait_until",
    "worker_argv",
]

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
WORKER_QUEUES = "warehouse,finance"
START_TIMEOUT = 60.0
WORKER_READY = " ready."  # celery logs "<name> ready." once it consumes
PUMP_READY = "resuming at LSN"


def worker_argv(
    name: str, concurrency: int, queues: str = WORKER_QUEUES, *, app: str = "worker"
) -> list[str]:
    """``celery -A worker worker`` as the stack runs it (``name`` as in ``-n``). Task
    events for Flower come from the app's ``worker_send_task_events``."""
    return [celery_bin(), "-A", app, "worker", "-Q", queues, "--pool", "prefork",
            "-c", str(concurrency), "-n", name, "--without-mingle", "--without-gossip",
            "-l", "INFO"]  # fmt: skip


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
    ) -> None:
        self.workdir = workdir.resolve()
        self.logdir = self.workdir / "logs"
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.redis = RedisServer(self.workdir / "redis", session=True)
        self.workers: list[Proc | None] = [None] * workers
        self.concurrency = concurrency
        self.web_workers = web_workers
        self.extra_env = dict(env or {})
        self.pump: Proc | None = None
        self.web: Proc | None = None
        self.flower: Proc | None = None
        self.web_port = 0  # 0 until uvicorn picked one; restarts reuse it
        self.flower_port = 0
        self.started: list[Proc] = []  # every start, in order (killed ones too)
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

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment of every process: see ``pipeline_env``."""
        return pipeline_env(self.redis.url, self.workdir, self.extra_env, extra)

    def spawn(self, role: str, argv: list[str], env: Mapping[str, str] | None = None) -> Proc:
        """Start ``argv`` in its own session, output to ``logs/NN-role.log``."""
        with self._lock:
            log_path = self.logdir / f"{len(self.started) + 1:02d}-{role}.log"
            cwd = ROOT if (ROOT / "worker.py").exists() else self.workdir
            proc = spawn(role, argv, log_path, cwd=cwd, env=self.env(env))
            self.started.append(proc)
            return proc

    def wait_log(self, proc: Proc, marker: str, timeout: float = START_TIMEOUT) -> None:
        """Until ``marker`` is in the process's log; StackError if it exits first."""

        def ready() -> bool:
            if not proc.alive:
                raise StackError(f"{proc.role} exited with {proc.popen.returncode}; see "
                                 f"{proc.log}:\n{proc.log_text()[-2000:]}")  # fmt: skip
            return marker in proc.log_text()

        wait_until(f"{proc.role} to start (log: {proc.log})", ready, timeout, 0.1)

    # ---------------------------------------------------------------- roles
    def start(self, *, web: bool = False, flower: bool = False) -> None:
        """Start the broker, the workers, the pump and, if asked, the web app and Flower;
        return once every one of them is ready."""
        self.redis.start()
        started = [self.start_worker(i, wait=False) for i in range(len(self.workers))]
        self.start_pump()
        if web:
            self.start_web()
        if flower:
            self.start_flower()
        for proc in started:
            self.wait_log(proc, WORKER_READY)

    def start_worker(self, index: int, *, wait: bool = True) -> Proc:
        with self._lock:
            name = f"worker{index + 1}"
            proc = self.spawn(name, worker_argv(f"{name}@%h", self.concurrency))
            self.workers[index] = proc
            if wait:
                self.wait_log(proc, WORKER_READY)
            return proc

    def start_pump(self) -> Proc:
        with self._lock:
            self.pump = self.spawn("pump", [celery_bin(), "-A", "worker", "pump"])
            self.wait_log(self.pump, PUMP_READY)
            return self.pump

    def start_web(self) -> str:
        """uvicorn with ``web_workers`` workers; the first start lets it pick its port
        (port 0, read from its log: no race), restarts reuse that port."""
        with self._lock:
            prom = self.workdir / "prometheus"
            shutil.rmtree(prom, ignore_errors=True)  # prometheus_client wants it empty
            prom.mkdir()
            argv = [sys.executable, "-m", "uvicorn", "tasks.web:app", "--host", "127.0.0.1",
                    "--port", str(self.web_port), "--workers", str(self.web_workers)]  # fmt: skip
            self.web = self.spawn("web", argv, {"PROMETHEUS_MULTIPROC_DIR": str(prom)})
            self.wait_log(self.web, "Uvicorn running on")
            found = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", self.web.log_text())
            if found is None:
                raise StackError(f"cannot find uvicorn's address in {self.web.log}")
            self.web_port = int(found.group(1))
            wait_until("the web app's /healthz", lambda: http_ok(f"{self.web_url}/healthz"),
                       START_TIMEOUT, 0.2)  # fmt: skip
            return self.web_url

    def start_flower(self) -> str:
        with self._lock:
            for _ in range(3):  # a free port can be taken before Flower binds it
                port = self.flower_port or free_port()
                argv = [celery_bin(), "-A", "worker", "flower", "--address=127.0.0.1",
                        f"--port={port}"]  # fmt: skip
                proc = self.flower = self.spawn("flower", argv)
                self._wait_flower(proc, f"http://127.0.0.1:{port}/healthcheck")
                if proc.alive:
                    self.flower_port = port
                    return self.flower_url
            raise StackError(f"Flower did not start; see {proc.log}")

    def _wait_flower(self, proc: Proc, url: str) -> None:
        wait_until(f"Flower (log: {proc.log})", lambda: not proc.alive or http_ok(url),
                        START_TIMEOUT, 0.2)  # fmt: skip

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
        pids = {p for proc in self.started for p in proc.leftovers()}
        if self.redis.running and self.redis.proc is not None:
            pids.add(self.redis.proc.pid)
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
                order = [p for p in reversed(self.started) if p.role in ("flower", "web")]
                order += [p for p in reversed(self.started) if p not in order]
                for proc in order:
                    proc.stop()
                self.redis.stop()

    def __enter__(self) -> LocalStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
