"""The producer: validation names the field and appends nothing; a valid purchase becomes
one durable record asking for the warehouse and the finance task, keyed by its id."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tasks.checkout import InvalidPurchaseError, record_purchase, validate
from tasks.targets import TARGETS, TASK_NAMES
from tests.example.example_relay import example_relay
from walrelay import DuplicateKeyError, Relay
from walrelay.record import decode, task_id

pytestmark = pytest.mark.timeout(30)


def purchase(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"customer": "Ada", "items": [{"sku": "book", "qty": 2}],
                           "total_cents": 4200, "currency": "eur"}  # fmt: skip
    doc.update(changes)
    return {k: v for k, v in doc.items() if v is not ...}


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    r = example_relay(tmp_path / "wal")
    yield r
    r.close()


def test_a_valid_purchase_becomes_one_record_with_two_tasks(relay: Relay) -> None:
    receipt = record_purchase(purchase(purchase_id="p-1"), relay=relay)
    assert (receipt.purchase_id, receipt.lsn) == ("p-1", 0)
    wal_id = relay.wal().wal_id
    assert receipt.task_ids == (task_id(wal_id, 0, "0"), task_id(wal_id, 0, "1"))
    entry = decode(next(iter(relay.wal().iter_from(0)))[1])
    assert entry.key == "p-1"
    assert [(t.target, t.name, t.queue) for t in entry.tasks] == [
        ("0", TASK_NAMES[TARGETS[0]], TARGETS[0]),
        ("1", TASK_NAMES[TARGETS[1]], TARGETS[1]),
    ]
    assert entry.tasks[0].args[0]["currency"] == "EUR"


def test_the_same_purchase_again_is_the_first_receipt_and_another_is_refused(
    relay: Relay,
) -> None:
    first = record_purchase(purchase(purchase_id="p-1"), relay=relay)
    assert record_purchase(purchase(purchase_id="p-1", currency="EUR"), relay=relay) == first
    with pytest.raises(DuplicateKeyError):
        record_purchase(purchase(purchase_id="p-1", total_cents=1), relay=relay)
    assert relay.wal().next_lsn() == 1


def test_a_missing_id_is_generated() -> None:
    assert len(validate(purchase())["purchase_id"]) == 32


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"customer": ""}, "customer"),
        ({"customer": ...}, "customer"),
        ({"customer": "Ada\x00"}, "customer"),
        ({"customer": "Ada\x1b[31m"}, "customer"),
        ({"items": []}, "items"),
        ({"items": [{"sku": "x", "qty": 0}]}, "items[0].qty"),
        ({"items": [{"sku": "x", "qty": True}]}, "items[0].qty"),
        ({"items": [{"sku": "", "qty": 1}]}, "items[0].sku"),
        ({"items": [{"sku": "a\x07", "qty": 1}]}, "items[0].sku"),
        ({"items": [{"sku": "x", "qty": 1, "colour": "red"}]}, "items[0].colour"),
        ({"total_cents": -1}, "total_cents"),
        ({"total_cents": 1.5}, "total_cents"),
        ({"total_cents": 2**53}, "total_cents"),
        ({"total_cents": 10**3999}, "total_cents"),
        ({"currency": "euro"}, "currency"),
        ({"currency": "ABC"}, "currency"),
        ({"currency": "XTS"}, "currency"),
        ({"purchase_id": "no spaces"}, "purchase_id"),
        ({"coupon": "FREE"}, "coupon"),
    ],
)
def test_invalid_input_names_the_field_and_appends_nothing(
    relay: Relay, changes: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidPurchaseError) as err:
        record_purchase(purchase(**changes), relay=relay)
    assert err.value.field == field
    assert isinstance(err.value, ValueError)
    assert relay.wal().next_lsn() == 0


def test_not_an_object_is_refused() -> None:
    with pytest.raises(InvalidPurchaseError, match="purchase"):
        validate(["a list"])


def test_iso_4217_codes_in_any_case_are_accepted_and_upper_cased() -> None:
    for code in ("usd", "Jpy", "XAF", "chf"):
        assert validate(purchase(currency=code))["currency"] == code.upper()
