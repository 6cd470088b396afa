"""The producer: validate a purchase, append it to the WAL, return once it is durable.

Never talks to the broker. Safe in forked web workers (gunicorn, uvicorn --workers): each
process opens its own handle on the shared log on first use."""

from __future__ import annotations

import os
import re
import threading
import uuid
from dataclasses import dataclass
from typing import Any, TypeGuard

from walrelay import RelaySettings
from walrelay.record import Entry, TaskSpec
from walstore import Options, Wal

WAREHOUSE_TASK = "tasks.warehouse.reserve_stock"
FINANCE_TASK = "tasks.finance.record_revenue"

# Used with fullmatch: "$" alone would let a trailing newline through.
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CURRENCY = re.compile(r"[A-Za-z]{3}")
_FIELDS = {"purchase_id", "customer", "items", "total_cents", "currency"}
MAX_ITEMS = 100


class InvalidPurchaseError(ValueError):
    """The purchase is malformed; ``field`` names the offending field. Nothing appended."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True)
class Receipt:
    purchase_id: str
    lsn: int


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_text(value: object, max_len: int) -> TypeGuard[str]:
    """Non-blank, bounded, and encodable as UTF-8 (a lone surrogate is not)."""
    if not isinstance(value, str) or not value.strip() or len(value) > max_len:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def validate(purchase: object) -> dict[str, Any]:
    """The normalised purchase, or InvalidPurchaseError naming the first bad field."""
    if not isinstance(purchase, dict):
        raise InvalidPurchaseError("purchase", "must be a JSON object")
    unknown = sorted(set(purchase) - _FIELDS)
    if unknown:
        raise InvalidPurchaseError(str(unknown[0]), "unknown field")
    pid = purchase.get("purchase_id")
    if pid is None:
        pid = uuid.uuid4().hex
    elif not isinstance(pid, str) or not _ID.fullmatch(pid):
        raise InvalidPurchaseError("purchase_id", "1-64 letters, digits, '-' or '_'")
    customer = purchase.get("customer")
    if not _is_text(customer, 200):
        raise InvalidPurchaseError("customer", "a non-empty string of at most 200 characters")
    items = purchase.get("items")
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_ITEMS:
        raise InvalidPurchaseError("items", f"a list of 1 to {MAX_ITEMS} items")
    clean_items = [_validate_item(i, item) for i, item in enumerate(items)]
    total = purchase.get("total_cents")
    if not _is_int(total) or total < 0:
        raise InvalidPurchaseError("total_cents", "an integer >= 0")
    currency = purchase.get("currency")
    if not isinstance(currency, str) or not _CURRENCY.fullmatch(currency):
        raise InvalidPurchaseError("currency", "a 3-letter ISO 4217 code")
    return {
        "purchase_id": pid,
        "customer": customer,
        "items": clean_items,
        "total_cents": total,
        "currency": currency.upper(),
    }


def _validate_item(index: int, item: object) -> dict[str, Any]:
    where = f"items[{index}]"
    if not isinstance(item, dict):
        raise InvalidPurchaseError(where, "must be an object with sku and qty")
    unknown = sorted(set(item) - {"sku", "qty"})
    if unknown:
        raise InvalidPurchaseError(f"{where}.{unknown[0]}", "unknown field")
    sku, qty = item.get("sku"), item.get("qty")
    if not _is_text(sku, 64):
        raise InvalidPurchaseError(f"{where}.sku", "a non-empty string of at most 64 characters")
    if not _is_int(qty) or not 1 <= qty <= 1_000_000:
        raise InvalidPurchaseError(f"{where}.qty", "an integer from 1 to 1000000")
    return {"sku": sku, "qty": qty}


def purchase_entry(purchase: dict[str, Any]) -> Entry:
    """The WAL entry for a validated purchase: one warehouse and one finance task."""
    return Entry(
        key=purchase["purchase_id"],
        tasks=(
            TaskSpec("warehouse", WAREHOUSE_TASK, "warehouse", [purchase]),
            TaskSpec("finance", FINANCE_TASK, "finance", [purchase]),
        ),
    )


_lock = threading.Lock()
_wals: dict[tuple[int, str], Wal] = {}


def wal_for(directory: str | None = None, options: Options | None = None) -> Wal:
    """This process's handle on the log in ``directory`` (default ``WAL_DIR``).

    Keyed by pid, so a handle inherited through fork is never used by the child.
    ``options`` (default ``Options.from_env()``) only count for the first call."""
    path = os.path.abspath(directory or RelaySettings.from_env().wal_dir)
    key = (os.getpid(), path)
    with _lock:
        wal = _wals.get(key)
        if wal is None:
            wal = _wals[key] = Wal.open(path, options or Options.from_env())
        return wal


def record_purchase(purchase: dict[str, Any], *, wal: Wal | None = None) -> Receipt:
    """Validate, append durably, return the receipt. Raises InvalidPurchaseError (a
    ValueError naming the field) before anything is appended, or a walstore error
    (LogFullError, LogPoisonedError) if the log cannot take it."""
    clean = validate(purchase)
    lsn = (wal or wal_for()).append(purchase_entry(clean).encode())
    return Receipt(clean["purchase_id"], lsn)
