"""``Relay``: binds walrelay to a user's Celery app.

``Relay(app)`` installs the worker-side ack handlers for that app only, makes the
worker use walrelay's consumer (unless the app chose its own), and is what
``celery -A <app> pump`` and ``celery -A <app> deadletters`` find (``Relay.of``).
Nothing is opened and no environment is read until the relay is first used.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import click
from celery import Celery
from celery.signals import celeryd_init

from walstore import Options, Wal

from . import acks
from .settings import RelaySettings

CONSUMER = "walrelay.worker.consumer:Consumer"
_ATTR = "_walrelay_relay"  # where an app keeps its relay


class Relay:
    """The durable sender of one Celery app (one per app; see ``Relay.of``)."""

    def __init__(
        self, app: Celery, wal_dir: str | None = None, *, settings: RelaySettings | None = None
    ) -> None:
        self.app = app
        self._wal_dir = wal_dir
        self._settings = settings
        self._lock = threading.Lock()
        self._wals: dict[int, Wal] = {}  # by pid: a handle is never used across a fork
        self.commands: dict[str, click.Command] = {}
        setattr(app, _ATTR, self)
        acks.install(app)
        celeryd_init.connect(_use_consumer, weak=False, dispatch_uid="walrelay-consumer")

    @classmethod
    def of(cls, app: Celery) -> Relay:
        """The relay bound to ``app`` (a new one with settings from the environment if
        the app never made one)."""
        found = getattr(app, _ATTR, None)
        return found if isinstance(found, Relay) else cls(app)

    # ---------------------------------------------------------------- settings, log
    @property
    def settings(self) -> RelaySettings:
        """Read from the environment on first use (``WAL_DIR``, ``PUMP_*``, ...)."""
        if self._settings is None:
            self._settings = RelaySettings.from_env()
        return self._settings

    @property
    def wal_dir(self) -> str:
        return os.path.abspath(self._wal_dir or self.settings.wal_dir)

    def wal(self) -> Wal:
        """This process's handle on the log (opened on first use, once per process)."""
        pid = os.getpid()
        with self._lock:
            wal = self._wals.get(pid)
            if wal is None:
                wal = self._wals[pid] = Wal.open(self.wal_dir, Options.from_env())
            return wal

    def close(self) -> None:
        """Close this process's handle on the log (a later use opens it again)."""
        with self._lock:
            wal = self._wals.pop(os.getpid(), None)
        if wal is not None:
            wal.close()

    # ---------------------------------------------------------------- commands
    def add_command(self, command: click.Command) -> click.Command:
        """Make ``celery -A <app> <command.name>`` run ``command`` (the name must also be
        declared as a ``celery.commands`` entry point to ``walrelay.commands.app``)."""
        assert command.name
        self.commands[command.name] = command
        return command


def _use_consumer(sender: Any = None, instance: Any = None, conf: Any = None, **_: Any) -> None:
    """At worker start: a worker of an app with a relay uses walrelay's consumer
    (reconnects within ~2 s, heals a stuck consumer, survives a lost Redis), unless the
    app set ``worker_consumer`` itself."""
    app = getattr(instance, "app", None)
    if conf is None or not isinstance(getattr(app, _ATTR, None), Relay):
        return
    if not conf.value_set_for("worker_consumer"):
        conf.worker_consumer = CONSUMER
