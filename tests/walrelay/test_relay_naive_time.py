"""A naive ``eta``/``expires`` is UTC, as Celery's workers read one
(``celery.worker.request`` uses ``maybe_make_aware``, naive as UTC), whatever the app's
timezone: the pump publishes it when Celery itself would run it."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
from celery import Celery

from walrelay import Relay, RelaySettings
from walrelay.record import decode
from walstore import Options, SyncPolicy

pytestmark = pytest.mark.timeout(60)

app = Celery("naive_tz", broker="memory://", set_as_current=False)
app.conf.update(timezone="America/New_York")


@app.task(name="naive_tz.ship")
def ship() -> None: ...


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    wal = str(tmp_path / "wal")
    r = Relay(app, wal, settings=RelaySettings(wal_dir=wal),
              wal_options=Options(sync=SyncPolicy.NONE, min_free_bytes=0))  # fmt: skip
    try:
        yield r
    finally:
        r.close()


@pytest.mark.parametrize("option", ["eta", "expires"])
@pytest.mark.parametrize("value", [datetime(2030, 1, 1, 12, 0), "2030-01-01T12:00:00"])
def test_a_naive_time_is_utc(relay: Relay, option: str, value: object) -> None:
    receipt = relay.send(ship.s().set(**cast(dict[str, Any], {option: value})))
    (_, payload), *_ = relay.wal().iter_from(receipt.lsn)
    got = decode(payload).tasks[0].options[option]
    assert got == datetime(2030, 1, 1, 12, 0, tzinfo=UTC).timestamp()
