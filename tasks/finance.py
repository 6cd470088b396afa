"""The demo finance: book the revenue of a purchase, once per purchase."""

from __future__ import annotations

from typing import Any

from celery import Task, shared_task

from .app import settings_of
from .ledger import ledger_for
from .targets import FINANCE, TASK_NAMES


@shared_task(bind=True, name=TASK_NAMES[FINANCE])
def record_revenue(self: Task[Any, Any], purchase: dict[str, Any]) -> None:
    detail = {
        "customer": purchase["customer"],
        "total_cents": purchase["total_cents"],
        "currency": purchase["currency"],
    }
    ledger_for(settings_of(self.app).ledger_url).record(FINANCE, purchase["purchase_id"], detail)
