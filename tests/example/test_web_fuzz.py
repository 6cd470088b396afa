"""Fuzzing POST /purchases: no answer is a 5xx, and only a 201 appends (exactly one record).

Two generators: schemathesis from the app's own OpenAPI schema (valid and invalid
bodies, every documented operation, responses checked against the schema), and
hypothesis with arbitrary JSON, near-miss purchases and raw bytes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.web import create_app
from tests.example.example_relay import example_relay
from tests.support.web_client import AppClient
from walrelay import Relay
from walrelay.record import decode
from walstore import Wal

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,  # no example database under the repo: runs are independent
)


class FakeLedger:
    def status_of(self, purchase_id: str) -> dict[str, str]:
        return {"warehouse": "done"} if purchase_id.startswith("a") else {}


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    r = example_relay(tmp_path / "wal")
    yield r
    r.close()


@pytest.fixture
def wal(relay: Relay) -> Wal:
    return relay.wal()


def check_append(wal: Wal, before: int, status: int, body: Any = None) -> None:
    """The invariant under test: 5xx never; a 201 appends one record (none when it is the
    same purchase again); 4xx appends none."""
    assert status < 500
    if status == 201 and wal.next_lsn() == before:
        assert isinstance(body, dict) and body.get("purchase_id")  # the first answer again
    elif status == 201:
        assert wal.next_lsn() == before + 1
        (lsn, payload), *_ = wal.iter_from(before)
        assert lsn == before
        if isinstance(body, dict) and body.get("purchase_id"):
            assert decode(payload).key == body["purchase_id"]
    else:
        assert 400 <= status < 500
        assert wal.next_lsn() == before


# ------------------------------------------------------------------ schemathesis
# The schema is loaded at collection (schemathesis.pytest.from_fixture breaks on pytest 9:
# it reads Function._nodeid), so the app reaches each test's relay through this holder.
_relays: list[Relay] = []
APP = create_app(relay=lambda: _relays[-1], ledger_status=FakeLedger().status_of)
SCHEMA = schemathesis.openapi.from_asgi("/openapi.json", APP)
SCHEMA.config.generation.update(
    modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE],
    max_examples=100,
    database="none",
)


@pytest.fixture
def app_wal(relay: Relay) -> Iterator[Wal]:
    _relays.append(relay)
    yield relay.wal()
    _relays.remove(relay)


@pytest.mark.timeout(240)
@SCHEMA.parametrize()
@FUZZ
def test_schemathesis_no_5xx_and_only_201_appends(case: Any, app_wal: Wal) -> None:
    wal = app_wal
    before = wal.next_lsn()
    response = case.call()
    case.validate_response(response)
    if case.method == "POST":
        check_append(wal, before, response.status_code, case.body)
    else:
        assert response.status_code < 500
        assert wal.next_lsn() == before


# ------------------------------------------------------------------ hypothesis
def json_values() -> st.SearchStrategy[Any]:
    scalars = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text()
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
        max_leaves=12,
    )


def near_purchases() -> st.SearchStrategy[dict[str, Any]]:
    """Purchases with each field valid or replaced by arbitrary JSON (or left out)."""
    item = st.fixed_dictionaries(
        {
            "sku": st.text(min_size=1, max_size=70) | json_values(),
            "qty": st.integers(-2, 1_000_002) | json_values(),
        }
    )
    fields = {
        "purchase_id": st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True) | json_values(),
        "customer": st.text(max_size=210) | json_values(),
        "items": st.lists(item | json_values(), max_size=3) | json_values(),
        "total_cents": st.integers(-5, 10**12) | json_values(),
        "currency": st.sampled_from(["EUR", "usd", "Jp", "EURO", "€€€"]) | json_values(),
    }
    optional = {"coupon": json_values()}
    return st.fixed_dictionaries({}, optional={**fields, **optional})


@pytest.fixture
def client(relay: Relay) -> Iterator[AppClient]:
    c = AppClient(create_app(relay=lambda: relay, ledger_status=FakeLedger().status_of))
    yield c
    c.close()


@pytest.mark.timeout(120)
@FUZZ
@given(doc=json_values() | near_purchases())
def test_arbitrary_json_never_5xx_and_only_201_appends(
    wal: Wal, client: AppClient, doc: Any
) -> None:
    before = wal.next_lsn()
    body = json.dumps(doc).encode()
    r = client.post("/purchases", content=body, headers={"content-type": "application/json"})
    assert r.status_code in (201, 409, 422), r.text
    if r.status_code in (409, 422):  # the field is named (an unknown key may be "")
        problem = r.json()
        assert isinstance(problem["field"], str) and problem["field"] in problem["detail"]
    check_append(wal, before, r.status_code, doc)


@pytest.mark.timeout(120)
@FUZZ
@given(body=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_arbitrary_bytes_never_5xx_and_append_nothing(
    wal: Wal, client: AppClient, body: bytes
) -> None:
    before = wal.next_lsn()
    r = client.post("/purchases", content=body, headers={"content-type": "application/json"})
    assert r.status_code in (201, 409, 422), r.text
    check_append(wal, before, r.status_code, None)
    if r.status_code == 201:  # only a real purchase can get in, and then it is whole
        assert isinstance(json.loads(body), dict)
