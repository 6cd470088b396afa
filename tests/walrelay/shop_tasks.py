"""The shop's tasks: each writes what it received (id, args, routing, headers) to
``$SHOP_OUT/<task id>.json`` when SHOP_OUT is set."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery import Task, shared_task


def _record(task: Task[Any, Any], *args: Any, **kwargs: Any) -> None:
    out = os.environ.get("SHOP_OUT")
    if not out:
        return
    req = task.request
    doc = {
        "name": task.name,
        "args": list(args),
        "kwargs": kwargs,
        "delivery_info": dict(req.delivery_info or {}),
        "priority": (req.delivery_info or {}).get("priority"),
        "custom": (req.headers or {}).get("custom") if isinstance(req.headers, dict) else None,
        "at": time.time(),
    }
    path = os.path.join(out, f"{req.id}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f)
    os.replace(path + ".tmp", path)


@shared_task(bind=True, name="shop.reserve")
def reserve(self: Task[Any, Any], order: dict[str, Any]) -> None:
    _record(self, order)


@shared_task(bind=True, name="shop.audit.purchase", expires=3600)
def audit(self: Task[Any, Any], order: dict[str, Any], *, note: str = "") -> None:
    _record(self, order, note=note)
