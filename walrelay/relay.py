"""``Relay``: binds walrelay to a user's Celery app, and sends its tasks durably.

``relay.send(*signatures, key=None, order_key=None)`` appends one record holding every
task and returns once it is durable; it never touches the broker.

``Relay(app)`` installs the worker-side ack handlers for that app only, makes the
worker use walrelay's consumer (unless the app chose its own), and is what
``celery -A <app> pump`` and ``celery -A <app> deadletters`` find (``Relay.of``).
Nothing is opened and no environment is read until the relay is first used.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import click
from celery import Celery
from celery.signals import celeryd_init

from walstore import Options, Wal

from . import acks
from .errors import SendError
from .keys import KeyIndex, close_index, digest, index_for, receipt_of
from .receipt import Receipt
from .record import Entry
from .settings import RelaySettings
from .signatures import arguments_json, task_specs

CONSUMER = "walrelay.worker.consumer:Consumer"
_ATTR = "_walrelay_relay"  # where an app keeps its relay
MAX_KEY_CHARS = 256


class Relay:
    """The durable sender of one Celery app (one per app; see ``Relay.of``)."""

    def __init__(
        self,
        app: Celery,
        wal_dir: str | None = None,
        *,
        settings: RelaySettings | None = None,
        wal_options: Options | Callable[[], Options] | None = None,
    ) -> None:
        """``wal_dir``: default ``settings.wal_dir`` (``WAL_DIR``). ``settings``: default
        ``RelaySettings.from_env()``, read on first use. ``wal_options``: the log's options,
        or a function making them when the log is first opened (default
        ``walstore.Options.from_env()``: ``WAL_SEGMENT_BYTES``, ``WAL_MAX_BYTES``, ...)."""
        self.app = app
        self._wal_dir = wal_dir
        self._settings = settings
        self._wal_options = wal_options
        self._lock = threading.Lock()
        self._wals: dict[int, Wal] = {}  # by pid: a handle is never used across a fork
        self._indexes: dict[int, KeyIndex] = {}  # by pid, as the log
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
                options = self._wal_options
                if callable(options):
                    options = options()
                wal = self._wals[pid] = Wal.open(self.wal_dir, options or Options.from_env())
            return wal

    def close(self) -> None:
        """Close this process's handles on the log and on its key index (a later use
        opens them again)."""
        with self._lock:
            wal = self._wals.pop(os.getpid(), None)
            self._indexes.pop(os.getpid(), None)
        if wal is not None:
            close_index(wal.directory)
            wal.close()

    # ---------------------------------------------------------------- sending
    def send(
        self, *signatures: Any, key: str | None = None, order_key: str | None = None
    ) -> Receipt:
        """Append ONE record holding every task (``task.s(...)`` signatures): all or none
        are committed; each is then published and confirmed on its own. Returns once the
        record is durable; never touches the broker.

        ``key``: idempotency key; a second send of it within ``idempotency_window`` with
        the same tasks returns the first receipt and appends nothing, with other tasks
        raises DuplicateKeyError. ``order_key``: records sharing it are published one at
        a time, in LSN order. Raises SendError (UnsupportedOptionError, UnknownTaskError,
        NotSerializableError) with nothing appended, or walstore's errors (LogFullError,
        LogPoisonedError, RecordTooLargeError, ...) unchanged."""
        _check_key("key", key)
        _check_key("order_key", order_key)
        now = time.time()
        tasks = task_specs(self.app, signatures, now)
        arguments = arguments_json(tasks)
        entry = Entry(key, tasks, order_key=order_key, created=now)
        payload = entry.encode()
        wal = self.wal()
        window = self.settings.idempotency_window
        if key is None or window <= 0:
            return receipt_of(wal.wal_id, wal.append(payload), entry)
        index = self._indexes.get(os.getpid())
        if index is None or index.closed:
            index = self._index(wal)
        return index.send_once(wal, entry, payload, digest(entry, arguments), window, now)

    def _index(self, wal: Wal) -> KeyIndex:
        with self._lock:
            index = self._indexes[os.getpid()] = index_for(wal)
            return index

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
    if conf.worker_consumer is None or not _configured(conf, "worker_consumer"):
        conf.worker_consumer = CONSUMER


def _configured(conf: Any, key: str) -> bool:
    """Whether the app's configuration sets ``key`` (even to Celery's default value):
    Celery's Settings chain the app's own maps before its defaults, which come last."""
    maps: list[Any] = list(getattr(conf, "maps", None) or ())
    return any(key in m for m in maps[:-1])


def _check_key(name: str, value: object) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_KEY_CHARS:
        raise SendError(f"{name} must be a string of 1 to {MAX_KEY_CHARS} characters")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise SendError(f"{name} holds a lone UTF-16 surrogate: not text") from None
