"""Attack: the same tasks, built with keyword arguments (or a dict argument) in another
order, are taken for other tasks: a retried send with the same key raises
DuplicateKeyError instead of returning the first receipt.

docs/api.md, ``key``: "A second send with the same key ... and the same tasks returns the
first receipt"; "the same tasks" compares args and kwargs. ``t.s(a=1, b=2)`` and
``t.s(b=2, a=1)`` are the same call (kwargs are a mapping; Celery's JSON body does not
promise an order), as are ``{"a": 1, "b": 2}`` and ``{"b": 2, "a": 1}``. A caller that
rebuilds its kwargs from a JSON document or a dict merge on retry hits this."""

from __future__ import annotations

from pathlib import Path

import pytest
from celery import Celery

from walrelay import Relay, RelaySettings
from walstore import Options, SyncPolicy

pytestmark = pytest.mark.timeout(60)


app = Celery("attack_keys", broker="memory://")


@app.task(name="attack_keys.ship")
def ship(order: object = None, **kw: object) -> None: ...


@pytest.fixture
def relay(tmp_path: Path):  # type: ignore[no-untyped-def]
    wal = str(tmp_path / "wal")
    r = Relay(app, wal, settings=RelaySettings(wal_dir=wal),
              wal_options=Options(sync=SyncPolicy.NONE, min_free_bytes=0))  # fmt: skip
    try:
        yield r, ship
    finally:
        r.close()


def test_kwargs_in_another_order_are_the_same_tasks(relay) -> None:  # type: ignore[no-untyped-def]
    r, ship = relay
    first = r.send(ship.s(sku="tea", qty=2), key="order-42")
    again = r.send(ship.s(qty=2, sku="tea"), key="order-42")  # DuplicateKeyError today
    assert again == first


def test_a_dict_argument_in_another_order_is_the_same_task(relay) -> None:  # type: ignore[no-untyped-def]
    r, ship = relay
    first = r.send(ship.s({"sku": "tea", "qty": 2}), key="order-43")
    again = r.send(ship.s({"qty": 2, "sku": "tea"}), key="order-43")  # DuplicateKeyError today
    assert again == first
