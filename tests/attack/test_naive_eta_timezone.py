"""Attack: a naive ``eta``/``expires`` is read as UTC even when the app sets a timezone.

docs/api.md, Options: ``eta`` - "``datetime`` or ISO 8601 string; a naive one is in the
app's timezone (UTC unless set)". With ``app.conf.timezone = "America/New_York"``, a naive
``datetime(2030, 1, 1, 12, 0)`` is 17:00 UTC; the record holds 12:00 UTC, five hours
early (and an ``expires`` five hours early too)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from celery import Celery

from walrelay import Relay, RelaySettings
from walrelay.record import decode
from walstore import Options, SyncPolicy

pytestmark = pytest.mark.timeout(60)

app = Celery("attack_tz", broker="memory://")
app.conf.timezone = "America/New_York"


@app.task(name="attack_tz.ship")
def ship() -> None: ...


@pytest.mark.parametrize("option", ["eta", "expires"])
@pytest.mark.parametrize("value", [datetime(2030, 1, 1, 12, 0), "2030-01-01T12:00:00"])
def test_a_naive_time_is_in_the_apps_timezone(tmp_path: Path, option: str, value: object) -> None:
    wal = str(tmp_path / "wal")
    relay = Relay(app, wal, settings=RelaySettings(wal_dir=wal),
                  wal_options=Options(sync=SyncPolicy.NONE, min_free_bytes=0))  # fmt: skip
    try:
        relay.send(ship.s().set(**{option: value}))
        [(_, payload)] = list(relay.wal().iter_from(0))
    finally:
        relay.close()
    got = datetime.fromtimestamp(decode(payload).tasks[0].options[option], UTC)
    assert got == datetime(2030, 1, 1, 17, 0, tzinfo=UTC), f"{option} recorded as {got}"
