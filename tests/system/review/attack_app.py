"""A user's Celery app for the review's tests:
``celery -A tests.system.review.attack_app worker|pump``.

Its one task writes ``$ATTACK_OUT/<task id>.json`` with when it started and ended, what
it received and the message's delivery info; ``secs`` makes it sleep in between."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery import Celery, Task

from walrelay import Relay

app = Celery("attack", broker=os.environ.get("CELERY_BROKER_URL", "memory://"))
app.conf.update(accept_content=["json"], task_acks_late=True, worker_prefetch_multiplier=1)
relay = Relay(app)


@app.task(bind=True, name="attack.note")
def note(self: Task[Any, Any], tag: str, secs: float = 0.0) -> str:
    started = time.time()
    time.sleep(secs)
    out = os.environ.get("ATTACK_OUT")
    if out:
        req = self.request
        doc = {"tag": tag, "started": started, "ended": time.time(),
               "delivery_info": dict(req.delivery_info or {}),
               "eta": str(req.eta), "expires": str(req.expires)}  # fmt: skip
        path = os.path.join(out, f"{req.id}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(doc, f)
        os.replace(path + ".tmp", path)
    return tag
