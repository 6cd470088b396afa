"""The demo warehouse: reserve the purchased items, once per purchase."""

from __future__ import annotations

from typing import Any

from celery import Task, shared_task

from .app import settings_of
from .ledger import ledger_for
from .targets import TASK_NAMES, WAREHOUSE


class StockUnavailableError(Exception):
    """The warehouse refuses an item (demo: its SKU is in WAREHOUSE_REJECT_SKUS)."""


@shared_task(bind=True, name=TASK_NAMES[WAREHOUSE])
def reserve_stock(self: Task[Any, Any], purchase: dict[str, Any]) -> None:
    settings = settings_of(self.app)
    items = purchase["items"]
    refused = sorted({i["sku"] for i in items} & settings.warehouse_reject_skus)
    if refused:
        raise StockUnavailableError(f"purchase {purchase['purchase_id']}: SKUs refused {refused}")
    ledger_for(settings.ledger_url).record(WAREHOUSE, purchase["purchase_id"], {"items": items})
