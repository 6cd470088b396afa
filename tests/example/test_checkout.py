"""The producer: validation names the field and appends nothing; a valid purchase becomes
one durable entry asking for the warehouse and the finance task."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tasks.checkout import (
    FINANCE_TASK,
    WAREHOUSE_TASK,
    InvalidPurchaseError,
    record_purchase,
    validate,
)
from walrelay.record import decode
from walstore import Options, SyncPolicy, Wal

pytestmark = pytest.mark.timeout(30)


def purchase(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"customer": "Ada", "items": [{"sku": "book", "qty": 2}],
                           "total_cents": 4200, "currency": "eur"}  # fmt: skip
    doc.update(changes)
    return {k: v for k, v in doc.items() if v is not ...}


@pytest.fixture
def wal(tmp_path: Path) -> Iterator[Wal]:
    with Wal.open(tmp_path / "wal", Options(sync=SyncPolicy.NONE, segment_bytes=8192)) as log:
        yield log


def test_a_valid_purchase_becomes_one_entry_with_two_tasks(wal: Wal) -> None:
    receipt = record_purchase(purchase(purchase_id="p-1"), wal=wal)
    assert (receipt.purchase_id, receipt.lsn) == ("p-1", 0)
    entry = decode(next(iter(wal.iter_from(0)))[1])
    assert entry.key == "p-1"
    assert [(t.target, t.name, t.queue) for t in entry.tasks] == [
        ("warehouse", WAREHOUSE_TASK, "warehouse"),
        ("finance", FINANCE_TASK, "finance"),
    ]
    assert entry.tasks[0].args[0]["currency"] == "EUR"


def test_a_missing_id_is_generated() -> None:
    assert len(validate(purchase())["purchase_id"]) == 32


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"customer": ""}, "customer"),
        ({"customer": ...}, "customer"),
        ({"items": []}, "items"),
        ({"items": [{"sku": "x", "qty": 0}]}, "items[0].qty"),
        ({"items": [{"sku": "x", "qty": True}]}, "items[0].qty"),
        ({"items": [{"sku": "", "qty": 1}]}, "items[0].sku"),
        ({"items": [{"sku": "x", "qty": 1, "colour": "red"}]}, "items[0].colour"),
        ({"total_cents": -1}, "total_cents"),
        ({"total_cents": 1.5}, "total_cents"),
        ({"currency": "euro"}, "currency"),
        ({"purchase_id": "no spaces"}, "purchase_id"),
        ({"coupon": "FREE"}, "coupon"),
    ],
)
def test_invalid_input_names_the_field_and_appends_nothing(
    wal: Wal, changes: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidPurchaseError) as err:
        record_purchase(purchase(**changes), wal=wal)
    assert err.value.field == field
    assert isinstance(err.value, ValueError)
    assert wal.next_lsn() == 0


def test_not_an_object_is_refused() -> None:
    with pytest.raises(InvalidPurchaseError, match="purchase"):
        validate(["a list"])
