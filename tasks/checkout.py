"""The producer: validate a purchase, send its warehouse and finance tasks durably in one
record (``relay.send``), return once it is durable. Never talks to the broker.

The purchase id is the idempotency key: the same purchase sent again returns the first
receipt, another purchase under the same id raises DuplicateKeyError. Safe in forked web
workers (gunicorn, uvicorn --workers): the relay opens one handle per process."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from walrelay import Relay

from .app import get_app
from .finance import record_revenue
from .purchase import InvalidPurchaseError, validate
from .warehouse import reserve_stock

__all__ = [
    "InvalidPurchaseError",
    "PurchaseReceipt",
    "record_purchase",
    "send_purchase",
    "validate",
]


@dataclass(frozen=True)
class PurchaseReceipt:
    purchase_id: str
    lsn: int  # the purchase's record in the write-ahead log
    task_ids: tuple[str, ...]  # warehouse, finance


def record_purchase(purchase: dict[str, Any], *, relay: Relay | None = None) -> PurchaseReceipt:
    """Validate, append durably, return the receipt. Raises InvalidPurchaseError (a
    ValueError naming the field) before anything is appended, DuplicateKeyError for
    another purchase under a known id, or the log's errors (LogFullError, ...)."""
    return send_purchase(validate(purchase), relay)


def send_purchase(clean: dict[str, Any], relay: Relay | None = None) -> PurchaseReceipt:
    """Send a purchase ``validate`` returned (default relay: the example app's)."""
    relay = relay or get_app().relay
    pid = clean["purchase_id"]
    receipt = relay.send(reserve_stock.s(clean), record_revenue.s(clean), key=pid)
    return PurchaseReceipt(pid, receipt.lsn, receipt.task_ids)
