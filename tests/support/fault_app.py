"""The product's Celery app (worker.py) with test-only hooks, for the fault suite's workers
(``celery -A fault_app worker`` with tests/ on PYTHONPATH): the same app, tasks and
settings as ``celery -A worker worker``, plus

- a purchase whose first SKU is ``slow-pre`` (``slow-post``) makes its tasks sleep
  ``FAULT_SLOW_SECONDS`` before (after) the effect, once they wrote
  ``$FAULT_MARKS/<task id>.pre`` (``.post``) holding the pool process's pid and its
  parent's: a test can kill exactly the process that is mid-task;
- a file ``$FAULT_MARKS/break-<worker pid>`` makes that worker drop its BRPOP socket from
  the event loop while kombu still believes it is polled: the consumer stays connected
  and idle whatever is queued, the state of celery#8030/#8082 (it then writes
  ``broken-<pid>``);
- ``FAULT_WATCHDOG=0`` runs Celery's plain consumer (no watchdog, kombu's backoff);
- ``FAULT_TASK_SECONDS`` makes every task sleep that long before its effect (a slow
  consumer);
- ``FAULT_PUMP_TASK=1`` registers a task ``fault.pump_only``: set for a pump (``celery -A
  fault_app pump``), not for the workers, it is a task the pump may send and no worker
  knows.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from celery import bootsteps
from celery.signals import task_postrun, task_prerun
from celery.worker.consumer.tasks import Tasks

from worker import app

__all__ = ["app"]


def _marks() -> Path:
    return Path(os.environ["FAULT_MARKS"])


def _slow(when: str, task_id: str | None, args: Any) -> None:
    try:
        sku = args[0]["items"][0]["sku"]
    except (IndexError, KeyError, TypeError):
        return
    if sku != f"slow-{when}" or not task_id:
        return
    (_marks() / f"{task_id}.{when}").write_text(f"{os.getpid()} {os.getppid()}")
    time.sleep(float(os.environ.get("FAULT_SLOW_SECONDS", "3")))


def _before(task_id: str | None = None, args: Any = None, **_: Any) -> None:
    _slow("pre", task_id, args)
    pause = float(os.environ.get("FAULT_TASK_SECONDS") or 0)
    if pause:
        time.sleep(pause)


def _after(task_id: str | None = None, args: Any = None, **_: Any) -> None:
    _slow("post", task_id, args)


task_prerun.connect(_before, weak=False)
task_postrun.connect(_after, weak=False)


class BreakConsumer(bootsteps.StartStopStep):
    """Polls for ``break-<pid>`` from the event loop (never from a signal handler, which
    could interrupt kombu halfway through changing the same tables)."""

    requires = (Tasks,)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        self.tref: Any = None
        super().__init__(c, **kwargs)

    def start(self, c: Any) -> None:
        if c.hub is not None:
            self.tref = c.timer.call_repeatedly(0.2, self.poll, (c,))

    def stop(self, c: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None

    def poll(self, c: Any) -> None:
        trigger = _marks() / f"break-{os.getpid()}"
        if not trigger.exists() or c.connection is None:
            return
        cycle = c.connection.transport.cycle
        dropped = []
        for fd, (_channel, kind) in list(cycle._fd_to_chan.items()):
            if kind == "BRPOP":
                c.hub.remove(fd)
                del cycle._fd_to_chan[fd]
                dropped.append(fd)
        if dropped:  # else no BRPOP was pending at this instant: try on the next poll
            trigger.unlink()
            (_marks() / f"broken-{os.getpid()}").write_text(" ".join(map(str, dropped)))


app.steps["consumer"].add(BreakConsumer)
if os.environ.get("FAULT_PUMP_TASK") == "1":

    @app.task(name="fault.pump_only")
    def pump_only(*args: Any) -> None:
        """Never runs: the workers do not register it."""


if os.environ.get("FAULT_WATCHDOG") == "0":
    app.conf.worker_consumer = "celery.worker.consumer:Consumer"
