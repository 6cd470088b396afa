"""A user's app for the review: a task that retries itself once (Celery's self.retry),
one that always fails, one that succeeds. ``celery -A tests.walrelay.retry_app worker``."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, Task

from walrelay import Relay

app = Celery("rv", broker=os.environ.get("CELERY_BROKER_URL", "memory://"))
app.conf.task_default_queue = "rv"
relay = Relay(app)


@app.task(bind=True, name="rv.ok")
def ok(self: Task[Any, Any], n: int) -> None:
    return None


@app.task(bind=True, name="rv.fails")
def fails(self: Task[Any, Any], n: int) -> None:
    raise RuntimeError("no")


@app.task(bind=True, name="rv.retry_once", max_retries=3)
def retry_once(self: Task[Any, Any], n: int) -> None:
    if self.request.retries == 0:
        raise self.retry(countdown=0)
