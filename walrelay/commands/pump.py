"""``celery -A worker pump``: run the pump for ``WAL_DIR`` (exactly one per WAL).

Registered as a Celery sub-command through the ``celery.commands`` entry point, as
Flower registers ``celery flower``.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import sys
import threading
from typing import Any

import click
from celery.bin.base import CeleryCommand

from walstore import Options, Wal, WalError
from walstore.fs import make_private_dirs

from ..brokers.kombu import KombuPublisher
from ..deadletters import DeadLetterStore
from ..errors import PumpLockedError
from ..metrics import Exporter, exporter_from_env, pump_registry
from ..policy import app_policy
from ..pump import Pump
from ..relay import Relay
from ..settings import DEFAULT_WAL_DIR, MetricsSettings, RelaySettings
from ..window import PumpConfig

LOCK_NAME = "pump.lock"


def acquire_pump_lock(wal_dir: str) -> int:
    """flock WAL_DIR/pump.lock (held until the process exits) and write our pid in it.

    Raises PumpLockedError naming the holder's pid."""
    make_private_dirs(wal_dir)  # a file in its place: "not a directory", named
    path = os.path.join(wal_dir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise PumpLockedError(
                f"another pump (pid {holder}) is running for {os.path.abspath(wal_dir)}"
            ) from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def pump_config(settings: RelaySettings, window: int | None = None) -> PumpConfig:
    return PumpConfig(
        window=window or settings.pump_window,
        ack_timeout=settings.pump_ack_timeout,
        max_ack_timeout=max(settings.pump_max_ack_timeout, settings.pump_ack_timeout),
        retry_delay=settings.pump_retry_delay,
        max_attempts=settings.pump_max_attempts,
        stall_timeout=settings.pump_stall_timeout,
        carry_after=settings.pump_carry_after,
    )


def serve_metrics(runner: Pump) -> Exporter | None:
    """Serve the pump's and its log's metrics if ``PUMP_METRICS_PORT`` is set.

    A bad value or a port in use ends the pump with a clear message: the operator asked
    for metrics there, and a pump that silently exports nothing looks healthy when not.
    Gauges come from ``runner.stats``, which the pump refreshes about once a second; the
    scrape never walks the pump's structures from the exporter's thread."""
    registry = pump_registry(lambda: runner.stats, lambda: runner.wal)
    try:
        exporter = exporter_from_env(registry)
    except (ValueError, OSError) as exc:
        click.echo(f"Error: cannot serve metrics: {exc}", err=True)
        sys.exit(1)
    if exporter is not None:
        host = exporter.server.server_address[0]
        logging.getLogger("walrelay.pump").info(
            "pump: metrics on http://%s:%d/metrics", host, exporter.port
        )
    return exporter


@click.command(cls=CeleryCommand)
@click.option(
    "--wal-dir", default=None, help=f"The log to pump (default: WAL_DIR or {DEFAULT_WAL_DIR})."
)
@click.option("--window", type=int, default=None, help="Most entries in flight (PUMP_WINDOW).")
@click.option("-l", "--loglevel", default="INFO", show_default=True, help="Logging level.")
@click.pass_context
def pump(ctx: click.Context, wal_dir: str | None, window: int | None, loglevel: str) -> None:
    """Publish every unconfirmed WAL entry as Celery tasks until confirmed."""
    app: Any = ctx.obj.app
    relay = Relay.of(app)
    try:
        settings = relay.settings
        options = Options.from_env()
    except ValueError as exc:  # a bad PUMP_* or WAL_* setting, named
        raise click.ClickException(str(exc)) from None
    try:
        MetricsSettings.from_env()  # checked now: before the log is opened or created
    except ValueError as exc:
        raise click.ClickException(f"cannot serve metrics: {exc}") from None
    directory = os.path.abspath(wal_dir) if wal_dir else relay.wal_dir
    logging.basicConfig(
        level=loglevel.upper(), format="[%(asctime)s: %(levelname)s/pump] %(message)s"
    )
    try:
        lock_fd = acquire_pump_lock(directory)
    except PumpLockedError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:
        raise click.ClickException(f"cannot use {directory} for the log: {exc}") from None
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    policy = app_policy(app, settings.pump_queues)
    try:
        wal = Wal.open(directory, options)
    except (WalError, OSError) as exc:
        os.close(lock_fd)
        raise click.ClickException(f"cannot open the log in {directory}: {exc}") from None
    publisher = KombuPublisher.for_app(app, wal.wal_id)
    exporter: Exporter | None = None
    try:
        runner = Pump(wal, publisher, DeadLetterStore(directory), pump_config(settings, window),
                      policy=policy)  # fmt: skip
        exporter = serve_metrics(runner)
        runner.run(stop)
    finally:
        if exporter is not None:
            exporter.close()
        publisher.close()
        wal.close()
        os.close(lock_fd)
