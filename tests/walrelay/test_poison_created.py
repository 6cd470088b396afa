"""A record whose ``created`` is a JSON integer too large for a float (review of
2026-11-30): ``record.decode`` raised OverflowError instead of BadRecordError, and the key
index, which skips only BadRecordError, failed every keyed send while it scanned the log."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.walrelay.shop_app import app as shop
from tests.walrelay.shop_tasks import reserve
from walrelay import Relay, RelaySettings
from walrelay.errors import BadRecordError
from walrelay.record import decode
from walstore import Options, SyncPolicy, Wal

pytestmark = pytest.mark.timeout(60)
OPTS = Options(sync=SyncPolicy.NONE, min_free_bytes=0)
POISON = (
    b'{"v":2,"key":"x","order_key":null,"origin":null,"created":1'
    + b"0" * 400
    + b',"tasks":[{"target":"0","name":"shop.reserve","queue":"stock","args":[],'
    b'"kwargs":{}}]}'
)


def test_decode_raises_only_bad_record_error() -> None:
    with pytest.raises(BadRecordError):
        decode(POISON)


def test_a_poison_created_does_not_fail_keyed_sends(tmp_path: Path) -> None:
    wal_dir = tmp_path / "wal"
    wal = Wal.open(wal_dir, OPTS)
    wal.append(POISON)  # the pump dead-letters it; the web app must keep taking orders
    wal.close()
    relay = Relay(shop, str(wal_dir), settings=RelaySettings(wal_dir=str(wal_dir)),
                  wal_options=OPTS)  # fmt: skip
    try:
        receipt = relay.send(reserve.s({"order": 1}), key="order-1")
        assert receipt.lsn == 1
    finally:
        relay.close()
