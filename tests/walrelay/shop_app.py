"""A Celery app that is not ours, written as a user writes one: its own task module
(``shop_tasks``), ``task_routes``, ``task_queues`` with a named topic exchange, and
``Relay(app)`` added. ``celery -A tests.walrelay.shop_app worker|pump`` runs it.

Its broker is ``CELERY_BROKER_URL`` (default: in memory, for unit tests); its tasks write
what they received under ``SHOP_OUT`` (see shop_tasks)."""

from __future__ import annotations

import os

from celery import Celery
from kombu import Exchange, Queue

from walrelay import Relay

app = Celery(
    "shop",
    broker=os.environ.get("CELERY_BROKER_URL", "memory://"),
    include=["tests.walrelay.shop_tasks"],
)
app.conf.update(
    task_default_queue="stock",
    task_queues=[
        Queue("stock", Exchange("stock"), routing_key="stock"),
        Queue("audit", Exchange("shop.events", type="topic"), routing_key="audit.#"),
    ],
    task_routes={
        "shop.reserve": {"queue": "stock"},
        "shop.audit.*": {"queue": "audit", "routing_key": "audit.purchase", "priority": 3},
    },
    accept_content=["json"],
    task_acks_late=True,
    worker_prefetch_multiplier=1,
)
relay = Relay(app)
