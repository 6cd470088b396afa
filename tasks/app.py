"""The Celery app: every setting that matters for delivery, and why.

``get_app()`` creates it on first use, reading the environment (``Settings.from_env``):
when ``celery -A worker`` imports ``worker.py``, or when a web worker or a script first
records a purchase. Nothing happens at import of this module.
"""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery

from walrelay import FsyncTimingFs, Relay
from walstore import Options

from .config import Settings
from .targets import TASK_NAMES

TASK_MODULES = ["tasks.warehouse", "tasks.finance"]


class PurchaseApp(Celery):
    """A Celery app that carries the example's settings (tasks read them from here) and
    its relay."""

    purchase_settings: Settings
    relay: Relay


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration for ``settings``; see the comment on each group."""
    return {
        "broker_url": settings.broker_url,
        # Security: JSON only, end to end. A pickle from the broker would be code execution.
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # At least once: a task is acknowledged to the broker only after it ran, so a
        # worker that dies mid-task leaves the message to be delivered again...
        "task_acks_late": True,
        # ... including when the pool process itself is killed (OOM, kill -9): the
        # message is rejected back to the queue instead of being acked as failed.
        "task_reject_on_worker_lost": True,
        # A task that raised is acked and its failure acked to the pump, which re-sends
        # it with backoff and dead-letters it after PUMP_MAX_ATTEMPTS.
        "task_acks_on_failure_or_timeout": True,
        # Prefetch 1: a worker reserves only the tasks it is about to run. The rest stay
        # in the queue for the other workers and are never stuck in a dead worker's
        # unacked set until the visibility timeout.
        "worker_prefetch_multiplier": 1,
        # Redis: a reserved, unacked task is handed to another worker after this many
        # seconds, so a task running longer runs twice (the ledger's idempotency absorbs
        # it). confirm_publish: publisher confirms on AMQP (py-amqp); Redis confirms
        # each LPUSH by its reply anyway and ignores the key. The socket timeouts keep
        # a half-open connection from hanging a publisher forever.
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout,
            "confirm_publish": True,
            "socket_connect_timeout": 5,
            "socket_timeout": 30,
            **settings.broker_transport_options,
        },
        # Broker down is an outage to ride out, never a reason to exit: retry forever,
        # at startup too.
        "broker_connection_retry": True,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "broker_channel_error_retry": True,
        # ... and back within ~2 s of the broker's return: the Relay makes workers use
        # walrelay's consumer (see walrelay.worker.consumer).
        # On connection loss the running late-ack tasks will be delivered again (AMQP)
        # or re-sent by the pump (Redis restarts empty): cancel them instead of letting
        # them finish into a duplicate.
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        # Producers that call .delay() directly retry their publish too.
        "task_publish_retry": True,
        # Flower must see everything: workers send task events, and .delay() senders
        # send task-sent events.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        # The pump learns outcomes from acks; there is no result backend to fill.
        "task_ignore_result": True,
        # Each target's task to the queue of its name (relay.send routes by these too).
        "task_routes": {name: {"queue": target} for target, name in TASK_NAMES.items()},
    }


def _timed_wal_options() -> Options:
    """The log's options from the environment, with a file layer that times each
    fdatasync for the ``wal_fsync_seconds`` histogram of /metrics (built when the log is
    first opened: the histogram exists only in processes that append)."""
    return Options.from_env(fs=FsyncTimingFs())


def create_app(settings: Settings | None = None) -> PurchaseApp:
    """The app for ``settings`` (default: from the environment), with the ack handlers."""
    settings = settings or Settings.from_env()
    app = PurchaseApp("walpurchase", include=TASK_MODULES)
    app.purchase_settings = settings
    app.conf.update(celery_config(settings))
    app.relay = Relay(app, settings=settings.relay, wal_options=_timed_wal_options)
    from .ledger_cli import ledger  # imports this module: only once the app exists

    app.relay.add_command(ledger)
    return app


_lock = threading.Lock()
_app: PurchaseApp | None = None


def get_app() -> PurchaseApp:
    """This process's app, created from the environment on first use."""
    global _app
    with _lock:
        if _app is None:
            _app = create_app()
        return _app


def settings_of(app: Celery) -> Settings:
    """The settings an app was created with (from the environment for a foreign app)."""
    found = getattr(app, "purchase_settings", None)
    return found if isinstance(found, Settings) else Settings.from_env()
