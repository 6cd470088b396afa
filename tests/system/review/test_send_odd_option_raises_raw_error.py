"""Attack: ``relay.send`` with option values of the wrong type or out of every range.

docs/api.md, Errors: ``SendError (ValueError)`` is "send refused its input; nothing
appended", with ``UnsupportedOptionError`` for "an option ... it cannot carry durably";
``countdown`` is "seconds from the send" and ``queue`` is resolved by routing.

Observed: ``countdown=10**400`` raises a bare ``OverflowError`` ("int too large to convert
to float", walrelay/signatures.py ``_seconds`` checks ``math.isfinite`` before it converts,
and ``now + value`` overflows), and ``queue=5`` raises a bare ``AttributeError`` ("'int'
object has no attribute 'encode'", ``task_spec`` encodes the resolved queue name without
checking its type). Neither is a SendError: a caller catching SendError (as tasks/web.py
does, for a 422) gets an unexpected exception instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.walrelay.shop_app import app as shop
from tests.walrelay.shop_tasks import reserve
from walrelay import Relay, RelaySettings, SendError
from walstore import Options, SyncPolicy

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    wal_dir = str(tmp_path / "wal")
    options = Options(sync=SyncPolicy.NONE, min_free_bytes=0)
    made = Relay(shop, wal_dir, settings=RelaySettings(wal_dir=wal_dir), wal_options=options)
    try:
        yield made
    finally:
        made.close()


@pytest.mark.parametrize(
    ("option", "value"),
    [("countdown", 10**400), ("expires", 10**400), ("queue", 5)],
)
def test_an_odd_option_value_is_refused_with_a_send_error(
    relay: Relay, option: str, value: Any
) -> None:
    before = relay.wal().next_lsn()
    try:
        relay.send(reserve.s("x").set(**{option: value}))
    except SendError as exc:
        assert option in str(exc), exc
    except Exception as exc:
        pytest.fail(f"{option}={value!r:.40}: {type(exc).__name__}: {exc} (not a SendError)")
    else:
        pytest.fail(f"{option}={value!r:.40} was accepted")
    assert relay.wal().next_lsn() == before
