"""End to end with an app that is not ours: ``celery -A tests.walrelay.shop_app worker``
and ``celery -A tests.walrelay.shop_app pump`` on a private redis-server deliver what
``relay.send`` recorded (routes, a short countdown, an idempotency key, an order key),
with the task ids of the receipt, and the acks bring the low water mark past it: the
countdown is held by the pump, the topic exchange and routing key are published, and the
second record of an order key waits for the first."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.stack import CELERY, Stack, wait_until
from tests.walrelay.shop_app import app as shop
from tests.walrelay.shop_tasks import audit, reserve
from walrelay import Relay, RelaySettings
from walrelay.record import decode
from walstore import Options

pytestmark = pytest.mark.timeout(180)
APP = "tests.walrelay.shop_app"


def delivered(out: Path, task_ids: tuple[str, ...]) -> dict[str, dict[str, Any]] | None:
    docs = {}
    for tid in task_ids:
        path = out / f"{tid}.json"
        if not path.exists():
            return None
        docs[tid] = json.loads(path.read_text())
    return docs


def test_the_shops_worker_and_pump_deliver_what_send_recorded(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    env = {"SHOP_OUT": str(out)}
    stack.start_worker(queues="stock,audit", app=APP, env=env)
    pump = stack.spawn("pump", [CELERY, "-A", APP, "pump"], env)
    wait_until("pump started", lambda: "resuming at LSN" in stack.log_of(pump), 60)

    relay = Relay(shop, str(stack.wal_dir), settings=RelaySettings(wal_dir=str(stack.wal_dir)),
                  wal_options=Options.from_env(stack.env()))  # fmt: skip
    try:
        order = {"order": 1, "lines": [{"sku": "book", "qty": 2}]}
        sent_at = time.time()
        first = relay.send(reserve.s(order).set(countdown=1), audit.s(order, note="paid"),
                           key="order-1", order_key="customer-7")  # fmt: skip
        again = relay.send(reserve.s(order).set(countdown=1), audit.s(order, note="paid"),
                           key="order-1", order_key="customer-7")  # fmt: skip
        second = relay.send(reserve.s({"order": 2}), key="order-2", order_key="customer-7")
        records = [decode(p) for _, p in relay.wal().iter_from(0)]
    finally:
        relay.close()
    assert again == first  # the key: appended once
    assert len(records) == 2

    ids = first.task_ids + second.task_ids
    got = wait_until("every task delivered", lambda: delivered(out, ids), 90, 0.2)
    assert got is not None
    reserved, audited, reserved2 = (got[t] for t in ids)
    assert (reserved["name"], reserved["args"]) == ("shop.reserve", [order])
    assert (audited["name"], audited["args"], audited["kwargs"]) == (
        "shop.audit.purchase", [order], {"note": "paid"})  # fmt: skip
    assert reserved2["args"] == [{"order": 2}]
    # The routes held: each task reached the worker through its own queue.
    assert reserved["delivery_info"]["routing_key"] == "stock"
    assert audited["delivery_info"]["routing_key"] in ("audit", "audit.purchase")

    # The acks reached the pump: both records confirmed, the low water mark past them.
    wait_until("both records confirmed", lambda: stack.wal_status().low_water_mark == 2, 60, 0.2)

    # What the record asks of the pump (asserted on the record until the pump does it).
    one, two = records
    assert one.order_key == two.order_key == "customer-7"
    assert sent_at + 1 <= one.tasks[0].options["eta"] <= sent_at + 2
    assert (one.tasks[1].options["exchange"], one.tasks[1].options["routing_key"]) == (
        "shop.events", "audit.purchase")  # fmt: skip
    assert reserved["at"] >= sent_at + 1  # the countdown, held by the pump
    assert audited["delivery_info"]["routing_key"] == "audit.purchase"
    assert audited["delivery_info"]["exchange"] == "shop.events"
    # The second record of customer-7 is published only once the first is confirmed.
    assert reserved2["at"] >= max(reserved["at"], audited["at"])
