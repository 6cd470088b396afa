"""The processes of a local pipeline, and how each is known to be ready: by a health check
or a ready file, never by a line in its log.

| role | started as | ready when |
|---|---|---|
| worker | ``celery -A APP worker -I tools.worker_ready`` | it wrote its ready file (1) |
| pump | ``celery -A APP pump``, ``PUMP_METRICS_PORT`` set | its metrics say ``pump_up 1`` |
| web | ``uvicorn tasks.web:app`` | ``GET /healthz`` answers 200 |
| flower | ``celery -A APP flower`` | ``GET /healthcheck`` answers 200 |

(1) on Celery's ``worker_ready`` signal: its consumer runs, it takes tasks.

(Redis: ``tools.redis_server``, ready when it answers PING.) Each starts in a
``Processes`` set: the demo and chaos (``LocalStack``), the tests (``tests.support``)
and the benchmarks use these same functions. A server given no port gets a free one;
if someone took it before the server bound it, the server exits and is started again
on another.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

from tools.processes import (
    START_TIMEOUT,
    Proc,
    Processes,
    ProcessExited,
    StackError,
    celery_bin,
    free_port,
    http_get,
    http_ok,
)

WORKER_QUEUES = "warehouse,finance"
READY_HOOK = "tools.worker_ready"  # imported into each worker: writes its ready file
SERVER_ATTEMPTS = 3  # starts of a server on a fresh free port before giving up


def worker_argv(
    name: str,
    concurrency: int,
    queues: str = WORKER_QUEUES,
    *,
    app: str = "worker",
    loglevel: str = "INFO",
) -> list[str]:
    """``celery -A APP worker`` as a stack runs it (``name`` as in ``-n``). Task events
    for Flower come from the app's ``worker_send_task_events``."""
    return [celery_bin(), "-A", app, "worker", "-Q", queues, "--pool", "prefork",
            "-c", str(concurrency), "-n", name, "--without-mingle", "--without-gossip",
            "-l", loglevel, "-I", READY_HOOK]  # fmt: skip


def start_worker(
    procs: Processes,
    role: str,
    concurrency: int,
    *,
    queues: str = WORKER_QUEUES,
    app: str = "worker",
    loglevel: str = "INFO",
    env: Mapping[str, str] | None = None,
    wait: bool = True,
) -> Proc:
    """A worker named ``role@%h``; with ``wait``, returned once it consumes."""
    argv = worker_argv(f"{role}@%h", concurrency, queues, app=app, loglevel=loglevel)
    proc = procs.spawn(role, argv, env)
    if wait:
        wait_worker(proc)
    return proc


def worker_ready(proc: Proc) -> bool:
    return proc.ready_file.exists()


def wait_worker(proc: Proc, timeout: float = START_TIMEOUT) -> None:
    """Until the worker wrote its ready file; ProcessExited if it exits first."""
    proc.wait_ready(f"{proc.role} to consume", lambda: worker_ready(proc), timeout)


def start_pump(
    procs: Processes, *, app: str = "worker", port: int = 0, env: Mapping[str, str] | None = None
) -> Proc:
    """``celery -A APP pump``, returned once its metrics answer. Its metrics port is
    ``port``, else ``PUMP_METRICS_PORT`` of its environment, else a free one."""
    given = procs.env(env).get("PUMP_METRICS_PORT", "").strip()
    port = port or (int(given) if given.isdigit() else 0)

    def start(chosen: int) -> Proc:
        extra = {**(env or {}), "PUMP_METRICS_PORT": str(chosen)}
        return procs.spawn("pump", [celery_bin(), "-A", app, "pump"], extra)

    return serve(start, port, pump_up, "the pump's metrics")


def pump_up(proc: Proc) -> bool:
    body = http_get(f"{proc.url}/metrics")
    return body is not None and b"_pump_up 1" in body


def start_web(procs: Processes, prometheus_dir: Path, *, port: int = 0, workers: int = 2) -> Proc:
    """``uvicorn tasks.web:app`` with ``workers`` workers sharing ``prometheus_dir`` (made
    empty first: prometheus_client wants it so), returned once ``/healthz`` answers."""
    shutil.rmtree(prometheus_dir, ignore_errors=True)
    prometheus_dir.mkdir(parents=True)

    def start(chosen: int) -> Proc:
        argv = [sys.executable, "-m", "uvicorn", "tasks.web:app", "--host", "127.0.0.1",
                "--port", str(chosen), "--workers", str(workers)]  # fmt: skip
        return procs.spawn("web", argv, {"PROMETHEUS_MULTIPROC_DIR": str(prometheus_dir)})

    return serve(start, port, lambda proc: http_ok(f"{proc.url}/healthz"), "the web app's /healthz")


def start_flower(
    procs: Processes, *, app: str = "worker", port: int = 0, env: Mapping[str, str] | None = None
) -> Proc:
    """``celery -A APP flower``, returned once ``/healthcheck`` answers."""

    def start(chosen: int) -> Proc:
        argv = [celery_bin(), "-A", app, "flower", "--address=127.0.0.1", f"--port={chosen}"]
        return procs.spawn("flower", argv, env)

    return serve(start, port, lambda proc: http_ok(f"{proc.url}/healthcheck"), "Flower")


def serve(
    start: Callable[[int], Proc],
    port: int,
    ready: Callable[[Proc], bool],
    what: str,
    timeout: float = START_TIMEOUT,
) -> Proc:
    """``start(port)`` and wait until ``ready``. With no ``port``, on a free one, and on
    another if the server exits before it is ready (the port was taken before it bound
    it), up to ``SERVER_ATTEMPTS`` times."""
    failure: ProcessExited | None = None
    for _ in range(1 if port else SERVER_ATTEMPTS):
        chosen = port or free_port()
        proc = start(chosen)
        proc.port = chosen
        try:
            proc.wait_ready(what, partial(ready, proc), timeout)
            return proc
        except ProcessExited as exc:
            if port:
                raise
            failure = exc
    raise StackError(f"{what}: {SERVER_ATTEMPTS} starts failed; the last: {failure}")
