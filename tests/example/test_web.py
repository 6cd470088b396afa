"""The web app against a real log in a temporary directory: 201 only once durable, the
same purchase again the first answer, another under its id 409, 422 naming the field
with nothing appended, 413 over 64 KiB, 415 for anything but application/json, 503 when
the log cannot take it, the ledger view, /healthz and the OpenAPI schema."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import unicodedata
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

import tasks.app
from tasks import purchase as rules
from tasks.ledger import ledger_for
from tasks.targets import TARGETS
from tasks.web import MAX_BODY_BYTES, create_app
from tests.example.example_relay import SMALL, example_relay
from tests.support.web_client import AppClient
from walrelay import Relay
from walrelay.record import decode
from walstore import CorruptLogError, Options, SyncPolicy, Wal
from walstore.fs import OsFs

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[2]
JSON = {"content-type": "application/json"}


def purchase(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "customer": "Ada",
        "items": [{"sku": "book-1", "qty": 2}],
        "total_cents": 4200,
        "currency": "eur",
    }
    doc.update(changes)
    return doc


class Ledger:
    """A stand-in for tasks.ledger: what each target recorded, or an error to raise."""

    def __init__(self) -> None:
        self.done: dict[str, set[str]] = {}
        self.error: Exception | None = None

    def status_of(self, purchase_id: str) -> Mapping[str, str]:
        if self.error is not None:
            raise self.error
        return {t: "done" for t in self.done.get(purchase_id, set())}


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    r = example_relay(tmp_path / "wal", sync=SyncPolicy.ALWAYS)
    yield r
    r.close()


@pytest.fixture
def wal(relay: Relay) -> Wal:
    return relay.wal()


@pytest.fixture
def ledger() -> Ledger:
    return Ledger()


@pytest.fixture
def client(relay: Relay, ledger: Ledger) -> Iterator[AppClient]:
    c = AppClient(create_app(relay=lambda: relay, ledger_status=ledger.status_of))
    yield c
    c.close()


def post_raw(client: AppClient, body: bytes) -> httpx.Response:
    return client.post("/purchases", content=body, headers=JSON)


# ------------------------------------------------------------------ 201 and durability
def test_created_purchase_is_durable_and_readable_after_reopen(
    tmp_path: Path, relay: Relay, client: AppClient
) -> None:
    wal = relay.wal()
    r1 = client.post("/purchases", json=purchase(purchase_id="order-1"))
    r2 = client.post("/purchases", json=purchase())
    assert r1.status_code == 201, r1.text
    assert r1.json() == {"purchase_id": "order-1", "lsn": 0}
    assert r1.headers["location"] == "/purchases/order-1"
    assert r2.status_code == 201 and r2.json()["lsn"] == 1
    generated = r2.json()["purchase_id"]
    assert len(generated) == 32
    assert wal.high_water_mark() == 2  # acknowledged means below the durable end

    wal.close()
    with Wal.open(tmp_path / "wal", Options(segment_bytes=SMALL)) as again:
        records = list(again.iter_from(0))
    assert [lsn for lsn, _ in records] == [0, 1]
    entries = [decode(payload) for _, payload in records]
    assert [e.key for e in entries] == ["order-1", generated]
    assert [t.queue for t in entries[0].tasks] == list(TARGETS)
    stored = entries[0].tasks[0].args[0]
    assert stored["currency"] == "EUR" and stored["items"] == [{"sku": "book-1", "qty": 2}]


def test_whole_json_numbers_are_integers(wal: Wal, client: AppClient) -> None:
    """JSON has one number type: 2.0 and 2e0 are the integer 2, as JSON Schema says."""
    body = b'{"customer": "Ada", "items": [{"sku": "a", "qty": 2.0}], "total_cents": 42e2,'
    body += b' "currency": "EUR", "purchase_id": "whole"}'
    r = post_raw(client, body)
    assert r.status_code == 201, r.text
    (_, payload), *_ = wal.iter_from(r.json()["lsn"])
    stored = decode(payload).tasks[0].args[0]
    assert stored["items"][0]["qty"] == 2 and isinstance(stored["items"][0]["qty"], int)
    assert stored["total_cents"] == 4200 and isinstance(stored["total_cents"], int)


# ------------------------------------------------------------------ 422 names the field
DEEP = b"[" * 10_000 + b"]" * 10_000
BAD_BODIES: list[tuple[str, bytes, str]] = [
    ("not an object", b"[1, 2]", "purchase"),
    ("malformed JSON", b'{"customer": ', "body"),
    ("empty body", b"", "body"),
    ("not UTF-8", b'{"customer": "\xff\xfe"}', "body"),
    ("NaN is not JSON", json.dumps(purchase(total_cents=float("nan"))).encode(), "body"),
    ("nested too deeply", DEEP, "body"),
    ("lone surrogate", json.dumps(purchase(customer="\ud800")).encode(), "customer"),
    ("surrogate in key", b'{"a\\udc00": 1}', "a\\udc00"),
]
BAD_FIELDS: list[tuple[str, dict[str, Any], str]] = [
    ("unknown field", purchase(coupon="x"), "coupon"),
    ("purchase_id spaces", purchase(purchase_id="a b"), "purchase_id"),
    ("purchase_id too long", purchase(purchase_id="a" * 65), "purchase_id"),
    ("purchase_id number", purchase(purchase_id=7), "purchase_id"),
    ("customer missing", {k: v for k, v in purchase().items() if k != "customer"}, "customer"),
    ("customer blank", purchase(customer="   "), "customer"),
    ("customer too long", purchase(customer="x" * 201), "customer"),
    ("items missing", {k: v for k, v in purchase().items() if k != "items"}, "items"),
    ("items empty", purchase(items=[]), "items"),
    ("items not a list", purchase(items={"sku": "a", "qty": 1}), "items"),
    ("too many items", purchase(items=[{"sku": "a", "qty": 1}] * 101), "items"),
    ("item not an object", purchase(items=["a"]), "items[0]"),
    ("item unknown field", purchase(items=[{"sku": "a", "qty": 1, "hue": 1}]), "items[0].hue"),
    ("sku empty", purchase(items=[{"sku": "", "qty": 1}]), "items[0].sku"),
    ("second sku", purchase(items=[{"sku": "a", "qty": 1}, {"qty": 1}]), "items[1].sku"),
    ("qty zero", purchase(items=[{"sku": "a", "qty": 0}]), "items[0].qty"),
    ("qty bool", purchase(items=[{"sku": "a", "qty": True}]), "items[0].qty"),
    ("qty float", purchase(items=[{"sku": "a", "qty": 1.5}]), "items[0].qty"),
    ("total negative", purchase(total_cents=-1), "total_cents"),
    ("total string", purchase(total_cents="5"), "total_cents"),
    ("total fraction", purchase(total_cents=1.5), "total_cents"),
    ("total too big to be exact", purchase(total_cents=1e300), "total_cents"),
    ("currency long", purchase(currency="EURO"), "currency"),
    ("currency digits", purchase(currency="123"), "currency"),
]


@pytest.mark.parametrize(
    ("body", "field"),
    [pytest.param(b, f, id=n) for n, b, f in BAD_BODIES]
    + [pytest.param(json.dumps(d).encode(), f, id=n) for n, d, f in BAD_FIELDS],
)
def test_invalid_input_is_422_naming_the_field_and_appends_nothing(
    wal: Wal, client: AppClient, body: bytes, field: str
) -> None:
    before = wal.next_lsn()
    r = post_raw(client, body)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field
    assert field in r.json()["detail"]
    assert wal.next_lsn() == before


@pytest.mark.parametrize(
    "ctype",
    [
        # What a cross-site form can post without a preflight (and what curl -d sends).
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data",
        # Accepted before: no Content-Type at all, other JSON types, another charset.
        None,
        "application/merge-patch+json",
        "application/json; charset=utf-16",
        "application/jsonx",
    ],
)
def test_anything_but_application_json_is_415_and_appends_nothing(
    wal: Wal, client: AppClient, ctype: str | None
) -> None:
    body = json.dumps(purchase()).encode()
    headers = {} if ctype is None else {"content-type": ctype}
    r = client.post("/purchases", content=body, headers=headers)
    assert r.status_code == 415, ctype
    assert r.json()["field"] == "body"
    assert wal.next_lsn() == 0


@pytest.mark.parametrize(
    "ctype",
    ["application/json", "application/json; charset=utf-8", "Application/JSON;charset=UTF-8"],
)
def test_application_json_is_accepted(wal: Wal, client: AppClient, ctype: str) -> None:
    r = client.post(
        "/purchases", content=json.dumps(purchase()).encode(), headers={"content-type": ctype}
    )
    assert r.status_code == 201, r.text


# ------------------------------------------------------------------ refused since issue 11
def control(char: str) -> dict[str, Any]:
    return purchase(customer=f"Ada{char}Lovelace")


REFUSED_BEFORE_ACCEPTED: list[tuple[str, bytes, str]] = [
    ("duplicate key", b'{"customer": "Ada", "customer": "Eve", "items": [{"sku": "a", "qty": 1}],'
     b' "total_cents": 1, "currency": "EUR"}', "customer"),
    ("duplicate nested key", b'{"customer": "Ada", "items": [{"sku": "a", "qty": 1, "qty": 9}],'
     b' "total_cents": 1, "currency": "EUR"}', "qty"),
    ("total of 4000 digits", json.dumps(purchase(total_cents=10**3999)).encode(), "total_cents"),
    ("total past 2**53", json.dumps(purchase(total_cents=2**53 + 2)).encode(), "total_cents"),
    ("UTF-16 body", json.dumps(purchase()).encode("utf-16"), "body"),
    ("UTF-16-LE body", json.dumps(purchase()).encode("utf-16-le"), "body"),
    ("UTF-8 BOM", b"\xef\xbb\xbf" + json.dumps(purchase()).encode(), "body"),
    ("currency not ISO 4217", json.dumps(purchase(currency="ABC")).encode(), "currency"),
    ("currency test code", json.dumps(purchase(currency="XTS")).encode(), "currency"),
    ("currency gold", json.dumps(purchase(currency="XAU")).encode(), "currency"),
    ("NUL in customer", json.dumps(control("\x00")).encode(), "customer"),
    ("ESC in customer", json.dumps(control("\x1b[2J")).encode(), "customer"),
    ("DEL in customer", json.dumps(control("\x7f")).encode(), "customer"),
    ("C1 control in customer", json.dumps(control("\x85")).encode(), "customer"),
    ("newline in sku", json.dumps(purchase(items=[{"sku": "a\nb", "qty": 1}])).encode(),
     "items[0].sku"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "field"), [pytest.param(b, f, id=n) for n, b, f in REFUSED_BEFORE_ACCEPTED]
)
def test_inputs_accepted_before_are_422_naming_the_field(
    wal: Wal, client: AppClient, body: bytes, field: str
) -> None:
    r = post_raw(client, body)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field
    assert field in r.json()["detail"]
    assert wal.next_lsn() == 0


def test_the_largest_exact_total_and_any_iso_currency_are_accepted(
    wal: Wal, client: AppClient
) -> None:
    r = client.post("/purchases", json=purchase(total_cents=2**53 - 1, currency="chf"))
    assert r.status_code == 201, r.text
    (_, payload), *_ = wal.iter_from(r.json()["lsn"])
    stored = decode(payload).tasks[0].args[0]
    assert (stored["total_cents"], stored["currency"]) == (2**53 - 1, "CHF")


# ------------------------------------------------------------------ idempotent POST
def test_the_same_purchase_again_is_the_first_answer_and_another_is_409(
    wal: Wal, client: AppClient
) -> None:
    first = client.post("/purchases", json=purchase(purchase_id="order-7"))
    # The same purchase, written differently (key order, case of the currency): same.
    again = post_raw(client, json.dumps({**purchase(currency="EUR"), "purchase_id": "order-7"},
                                        sort_keys=True).encode())  # fmt: skip
    other = client.post("/purchases", json=purchase(purchase_id="order-7", total_cents=1))
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json() == {"purchase_id": "order-7", "lsn": 0}
    assert other.status_code == 409 and other.json()["field"] == "purchase_id"
    assert wal.next_lsn() == 1


# ------------------------------------------------------------------ 413 over 64 KiB
def padded(size: int) -> bytes:
    """A valid purchase padded with JSON whitespace to exactly ``size`` bytes."""
    body = json.dumps(purchase()).encode()
    return body + b" " * (size - len(body))


async def chunks(body: bytes, step: int = 4096) -> AsyncIterator[bytes]:
    for i in range(0, len(body), step):
        yield body[i : i + step]


def test_body_of_exactly_64_kib_is_accepted(wal: Wal, client: AppClient) -> None:
    assert MAX_BODY_BYTES == 64 * 1024
    r = post_raw(client, padded(MAX_BODY_BYTES))
    assert r.status_code == 201, r.text


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_64_kib_is_413_and_appends_nothing(
    wal: Wal, client: AppClient, chunked: bool
) -> None:
    body = padded(MAX_BODY_BYTES + 1)
    if chunked:
        r = client.post("/purchases", content=chunks(body), headers=JSON)
        assert "content-length" not in r.request.headers
        assert r.request.headers["transfer-encoding"] == "chunked"
    else:
        r = post_raw(client, body)
        assert r.request.headers["content-length"] == str(MAX_BODY_BYTES + 1)
    assert r.status_code == 413
    assert r.json()["field"] == "body"
    assert "connection" not in r.headers  # drained: the connection can be reused
    assert wal.next_lsn() == 0


def test_declared_length_over_the_limit_is_413_whatever_arrives(client: AppClient) -> None:
    # Within the drain bound the body is read and dropped (the connection stays usable);
    # far past it the answer comes at once and the connection is closed.
    for declared, closes in ((MAX_BODY_BYTES + 1, False), (100 * MAX_BODY_BYTES, True)):
        headers = {**JSON, "content-length": str(declared)}
        r = client.post("/purchases", content=b"{}", headers=headers)
        assert r.status_code == 413
        assert (r.headers.get("connection") == "close") is closes


# ------------------------------------------------------------------ 503 + Retry-After
def test_full_log_is_503_with_retry_after_and_appends_nothing(tmp_path: Path) -> None:
    seg = 8192
    small = example_relay(tmp_path / "small", segment_bytes=seg, max_bytes=2 * seg)
    client = AppClient(create_app(relay=lambda: small))
    try:
        statuses = [client.post("/purchases", json=purchase()) for _ in range(80)]
        codes = [r.status_code for r in statuses]
        first_full = codes.index(503)
        assert first_full > 5 and set(codes[:first_full]) == {201}
        assert set(codes[first_full:]) == {503}
        full = statuses[first_full]
        assert int(full.headers["retry-after"]) > 0
        assert "WAL_MAX_BYTES" in full.json()["detail"]
        assert small.wal().next_lsn() == first_full  # the refused ones left no trace
    finally:
        client.close()
        small.close()


class FailingFsyncFs(OsFs):
    """The real file layer whose fdatasync fails with EIO once ``broken`` is set."""

    broken = False

    def fdatasync(self, fd: int) -> None:
        if self.broken:
            raise OSError(errno.EIO, "injected fsync failure")
        super().fdatasync(fd)


def test_poisoned_log_is_503_with_retry_after(tmp_path: Path) -> None:
    fs = FailingFsyncFs()
    relay = example_relay(tmp_path / "wal", sync=SyncPolicy.ALWAYS, fs=fs)
    client = AppClient(create_app(relay=lambda: relay))
    try:
        assert client.post("/purchases", json=purchase()).status_code == 201
        fs.broken = True
        first = client.post("/purchases", json=purchase())
        fs.broken = False  # the disk "recovers": the log must stay refused (fsyncgate)
        second = client.post("/purchases", json=purchase())
        health = client.get("/healthz")
    finally:
        client.close()
        relay.close()
    for r in (first, second):
        assert r.status_code == 503, r.text
        assert int(r.headers["retry-after"]) > 0
        assert "poisoned" in r.json()["detail"]
    assert health.status_code == 503 and health.json()["status"] == "unavailable"


def test_a_log_that_cannot_be_opened_is_503(tmp_path: Path) -> None:
    def broken() -> Relay:
        raise CorruptLogError("00000000000000000000", 64, "record failed verification")

    client = AppClient(create_app(relay=broken))
    try:
        r = client.post("/purchases", json=purchase())
        health = client.get("/healthz")
    finally:
        client.close()
    assert r.status_code == 503 and "retry-after" in r.headers
    assert "corrupt" in r.json()["detail"]
    assert health.status_code == 503


def test_a_damaged_key_index_is_503_naming_the_repair(tmp_path: Path) -> None:
    relay = example_relay(tmp_path / "wal")
    client = AppClient(create_app(relay=lambda: relay))
    try:
        assert client.post("/purchases", json=purchase()).status_code == 201
        relay.close()  # the index is opened again at the next keyed send, damaged by then
        with open(tmp_path / "wal" / "keys.sqlite3", "r+b") as f:
            f.write(b"\x5a" * 100)
        r = client.post("/purchases", json=purchase())
    finally:
        client.close()
        relay.close()
    assert r.status_code == 503, r.text
    assert int(r.headers["retry-after"]) > 0
    assert "keys.sqlite3" in r.json()["detail"] and "remove" in r.json()["detail"]


# ------------------------------------------------------------------ GET, health, schema
def test_get_purchase_reports_each_target_from_the_ledger(
    client: AppClient, ledger: Ledger
) -> None:
    assert client.get("/purchases/p-1").json() == {
        "purchase_id": "p-1",
        "warehouse": "pending",
        "finance": "pending",
    }
    ledger.done["p-1"] = {"warehouse"}
    assert client.get("/purchases/p-1").json()["warehouse"] == "done"
    ledger.done["p-1"] = {"warehouse", "finance"}
    assert client.get("/purchases/p-1").json() == {
        "purchase_id": "p-1",
        "warehouse": "done",
        "finance": "done",
    }


def test_get_purchase_rejects_bad_ids_and_reports_ledger_outage(
    client: AppClient, ledger: Ledger
) -> None:
    r = client.get("/purchases/a%20b")
    assert r.status_code == 422 and r.json()["field"] == "purchase_id"
    ledger.error = OSError("database is locked")
    r = client.get("/purchases/p-1")
    assert r.status_code == 503 and int(r.headers["retry-after"]) > 0


def test_get_purchase_reads_the_real_ledger(
    tmp_path: Path, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    monkeypatch.setenv("LEDGER_URL", url)  # read by tasks.ledger at the first GET
    book = ledger_for(url)
    book.record("finance", "p-2", {"total_cents": 1})
    client = AppClient(create_app(relay=lambda: relay))  # default ledger_status
    try:
        r = client.get("/purchases/p-2")
    finally:
        client.close()
        book.close()
    assert r.status_code == 200, r.text
    assert r.json() == {"purchase_id": "p-2", "warehouse": "pending", "finance": "done"}


def test_healthz(wal: Wal, client: AppClient) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "wal_id": wal.wal_id}


def test_openapi_describes_the_purchase_body_and_answers(client: AppClient) -> None:
    schema = client.get("/openapi.json").json()
    post = schema["paths"]["/purchases"]["post"]
    body = post["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/Purchase"}
    assert {"201", "413", "415", "422", "503"} <= set(post["responses"])
    model = schema["components"]["schemas"]["Purchase"]
    assert set(model["required"]) == {"customer", "items", "total_cents", "currency"}
    assert model["additionalProperties"] is False
    item_ref = model["properties"]["items"]["items"]["$ref"].rsplit("/", 1)[1]
    assert schema["components"]["schemas"][item_ref]["required"] == ["sku", "qty"]
    assert {"/purchases/{purchase_id}", "/healthz", "/metrics"} <= set(schema["paths"])


def test_import_opens_nothing_reads_no_env_and_needs_no_broker(tmp_path: Path) -> None:
    """Importing the web app connects to nothing (the broker cannot affect its answers)
    and opens no log."""
    wal_dir = tmp_path / "wal"
    script = (
        "import socket\n"
        "def refuse(*a, **k): raise AssertionError('connect at import')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
        "import tasks.web\n"
    )
    env = dict(os.environ, WAL_DIR=str(wal_dir), CELERY_BROKER_URL="redis://127.0.0.1:1/0")
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert not wal_dir.exists()


def test_default_relay_is_the_example_apps_opened_lazily_from_wal_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WAL_SEGMENT_BYTES", str(SMALL))  # read when the log is opened
    monkeypatch.setenv("WAL_DIR", str(tmp_path / "lazy"))  # read when the app is created
    monkeypatch.setattr(tasks.app, "_app", None)  # this test's own app (restored after)
    wal_dir = tmp_path / "lazy"
    app = create_app()
    assert not wal_dir.exists() and tasks.app._app is None
    client = AppClient(app)
    try:
        r = client.post("/purchases", json=purchase(purchase_id="lazy-1"))
    finally:
        client.close()
    assert r.status_code == 201 and wal_dir.is_dir()
    relay = tasks.app.get_app().relay  # this process's app, made by the first request
    try:
        assert [decode(p).key for _, p in relay.wal().iter_from(0)] == ["lazy-1"]
    finally:
        relay.close()


def test_schema_text_pattern_is_pythons_whitespace_and_controls() -> None:
    """The documented text pattern says exactly "no control character, not blank", as
    str.isspace() and the Unicode category Cc say it, for every code point."""
    pattern = re.compile(rules.TEXT_PATTERN)
    mismatched = [
        hex(c)
        for c in range(sys.maxunicode + 1)
        if (pattern.match(chr(c)) is None)
        != (chr(c).isspace() or unicodedata.category(chr(c)) == "Cc")
    ]
    assert mismatched == []


@pytest.mark.parametrize("field", ["purchase_id", "currency"])
def test_trailing_newline_is_refused(wal: Wal, client: AppClient, field: str) -> None:
    value = {"purchase_id": "order-1\n", "currency": "EUR\n"}[field]
    r = client.post("/purchases", json=purchase(**{field: value}))
    assert r.status_code == 422
    assert wal.next_lsn() == 0
