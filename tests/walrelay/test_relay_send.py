"""relay.send with an app that is not ours (tests/walrelay/shop_app.py: its own task
module, task_routes, task_queues with a topic exchange): the record it writes, decoded;
what it carries, what it refuses (nothing appended), walstore's errors unchanged."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, chain, chord, group

from tests.walrelay.shop_app import app as shop
from tests.walrelay.shop_tasks import audit, reserve
from walrelay import (
    LogFullError,
    NotSerializableError,
    Receipt,
    RecordTooLargeError,
    Relay,
    RelayError,
    RelaySettings,
    SendError,
    UnknownTaskError,
    UnsupportedOptionError,
)
from walrelay.record import Entry, decode, task_id
from walstore import Options, SyncPolicy

pytestmark = pytest.mark.timeout(60)
ORDER = {"order": 42, "lines": [{"sku": "book", "qty": 2}], "note": "ünïcode ok"}


def loose(sig: Any) -> Any:
    """The signature, for options of the wrong type on purpose (celery-types checks them)."""
    return sig


def fast(**changes: Any) -> Options:
    return Options(**{"sync": SyncPolicy.NONE, "segment_bytes": 1 << 20, **changes})


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    r = Relay(shop, str(tmp_path / "wal"), settings=RelaySettings(), wal_options=fast())
    yield r
    r.close()


def records(relay: Relay) -> list[tuple[int, Entry]]:
    return [(lsn, decode(payload)) for lsn, payload in relay.wal().iter_from(0)]


# ------------------------------------------------------------------ the record
def test_one_record_holds_every_task_routed_by_the_apps_router(relay: Relay) -> None:
    before = time.time()
    receipt = relay.send(reserve.s(ORDER), audit.s(ORDER, note="n"), key="o-1", order_key="c-7")
    [(lsn, entry)] = records(relay)
    assert isinstance(receipt, Receipt)
    wal_id = relay.wal().wal_id
    assert receipt == Receipt(lsn, "o-1", (task_id(wal_id, lsn, "0"), task_id(wal_id, lsn, "1")))
    assert (entry.key, entry.order_key, entry.origin) == ("o-1", "c-7", None)
    assert entry.created is not None and before <= entry.created <= time.time()
    first, second = entry.tasks
    # task_routes "shop.reserve" -> queue stock (direct exchange: the default exchange and
    # the queue's name, as Celery itself publishes it).
    assert (first.target, first.name, first.queue) == ("0", "shop.reserve", "stock")
    assert (first.args, first.kwargs) == ([ORDER], {})
    assert first.options == {"exchange": "", "routing_key": "stock"}
    # "shop.audit.*" -> queue audit on the topic exchange with the route's routing key and
    # priority; expires=3600 is the task's own attribute, merged as apply_async does.
    assert (second.target, second.name, second.queue) == ("1", "shop.audit.purchase", "audit")
    assert (second.args, second.kwargs) == ([ORDER], {"note": "n"})
    expires = second.options.pop("expires")
    assert before + 3600 <= expires <= time.time() + 3600
    assert second.options == {"exchange": "shop.events", "routing_key": "audit.purchase",
                              "priority": 3}  # fmt: skip


def test_the_signatures_queue_and_routing_options_win_over_the_route(relay: Relay) -> None:
    relay.send(
        reserve.s(ORDER).set(queue="audit", routing_key="audit.manual"),
        audit.s(ORDER).set(queue="stock", priority=1),
    )
    [(_, entry)] = records(relay)
    assert [(t.queue, t.options["exchange"], t.options["routing_key"]) for t in entry.tasks] == [
        ("audit", "shop.events", "audit.manual"),
        ("stock", "", "stock"),
    ]
    assert entry.tasks[1].options["priority"] == 1  # the signature's, over the route's 3


def test_timing_priority_and_headers_are_carried_as_absolute_values(relay: Relay) -> None:
    eta = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    naive = datetime(2030, 1, 2, 3, 4, 5)  # the app's timezone: UTC (enable_utc)
    before = time.time()
    relay.send(
        reserve.s(ORDER).set(countdown=30, expires=600, priority=9, headers={"custom": "x"}),
        reserve.s(ORDER).set(eta=eta, expires=eta + timedelta(hours=1)),
        loose(reserve.s(ORDER)).set(eta=naive.isoformat()),
    )
    after = time.time()
    [(_, entry)] = records(relay)
    one, two, three = (t.options for t in entry.tasks)
    assert before + 30 <= one["eta"] <= after + 30
    assert before + 600 <= one["expires"] <= after + 600
    assert (one["priority"], one["headers"]) == (9, {"custom": "x"})
    assert two["eta"] == eta.timestamp() and two["expires"] == eta.timestamp() + 3600
    assert three["eta"] == eta.timestamp()
    assert entry.tasks[0].eta == one["eta"]


def test_sends_without_a_key_never_touch_the_index(relay: Relay, tmp_path: Path) -> None:
    a, b = relay.send(reserve.s(ORDER)), relay.send(reserve.s(ORDER))
    assert (a.lsn, b.lsn, a.key) == (0, 1, None)
    assert not (tmp_path / "wal" / "keys.sqlite3").exists()


# ------------------------------------------------------------------ refused, nothing appended
def frozen() -> Any:
    sig = reserve.s(ORDER)
    sig.freeze()  # a caller-given task id
    return sig


REFUSED: list[tuple[str, Any, type[RelayError], str]] = [
    ("link", lambda: [reserve.s(ORDER).set(link=audit.s(ORDER))], UnsupportedOptionError, "link"),
    ("link_error", lambda: [reserve.s(ORDER).on_error(audit.s())], UnsupportedOptionError,
     "link_error"),
    ("chain", lambda: [chain(reserve.s(ORDER), audit.s())], UnsupportedOptionError, "chain"),
    ("group", lambda: [group(reserve.s(ORDER), audit.s(ORDER))], UnsupportedOptionError, "group"),
    ("chord", lambda: [chord([reserve.s(ORDER)], audit.s())], UnsupportedOptionError, "chord"),
    ("task_id", lambda: [frozen()], UnsupportedOptionError, "task_id"),
    ("task_id set", lambda: [reserve.s(ORDER).set(task_id="mine")], UnsupportedOptionError,
     "task_id"),
    ("time_limit", lambda: [loose(reserve.s(ORDER)).set(time_limit=5)], UnsupportedOptionError,
     "time_limit"),
    ("shadow", lambda: [reserve.s(ORDER).set(shadow="x")], UnsupportedOptionError, "shadow"),
    ("pickle", lambda: [reserve.s(ORDER).set(serializer="pickle")], UnsupportedOptionError,
     "serializer"),
    ("countdown and eta", lambda: [reserve.s(ORDER).set(countdown=1, eta=datetime.now(UTC))],
     UnsupportedOptionError, "countdown or eta"),
    ("countdown text", lambda: [loose(reserve.s(ORDER)).set(countdown="5")], UnsupportedOptionError,
     "countdown"),
    ("countdown inf", lambda: [reserve.s(ORDER).set(countdown=float("inf"))],
     UnsupportedOptionError, "countdown"),
    ("eta garbage", lambda: [loose(reserve.s(ORDER)).set(eta="soon")], UnsupportedOptionError,
     "eta"),
    ("priority 300", lambda: [reserve.s(ORDER).set(priority=300)], UnsupportedOptionError,
     "priority"),
    ("celery header", lambda: [reserve.s(ORDER).set(headers={"id": "x"})],
     UnsupportedOptionError, "id"),
    # review 4: accepted, then silently replaced by the pump's own
    ("walrelay header", lambda: [reserve.s(ORDER).set(headers={"walrelay_copy": "x"})],
     UnsupportedOptionError, "walrelay_copy"),
    ("second task bad", lambda: [reserve.s(ORDER), audit.s(ORDER).set(link=reserve.s(1))],
     UnsupportedOptionError, "task 1"),
    ("unknown task", lambda: [shop.signature("shop.nope", args=(1,))], UnknownTaskError,
     "shop.nope"),
    ("datetime arg", lambda: [reserve.s({"at": datetime.now(UTC)})], NotSerializableError,
     "task 0 (shop.reserve): args"),
    ("set kwarg", lambda: [audit.s(ORDER, note={1, 2})], NotSerializableError, "kwargs"),
    ("NaN", lambda: [reserve.s(float("nan"))], NotSerializableError, "args"),
    ("lone surrogate", lambda: [reserve.s(ORDER), reserve.s("\ud800")], NotSerializableError,
     "task 1"),
    ("header not JSON", lambda: [loose(reserve.s(ORDER)).set(headers={"custom": b"x"})],
     NotSerializableError, "headers"),
    ("queue not text", lambda: [reserve.s(ORDER).set(queue="q\ud800")],
     UnsupportedOptionError, "task 0 (shop.reserve): queue"),
    ("topic routing key not text", lambda: [
        audit.s(ORDER).set(exchange="shop.events", routing_key="audit.\ud800")],
     UnsupportedOptionError, "routing_key"),
    ("exchange bytes", lambda: [loose(audit.s(ORDER)).set(exchange=b"shop.events")],
     UnsupportedOptionError, "exchange"),
    ("routing key bytes", lambda: [loose(audit.s(ORDER)).set(routing_key=b"audit.x")],
     UnsupportedOptionError, "routing_key"),
    ("no task", lambda: [], SendError, "at least one"),
    ("not a signature", lambda: [reserve], SendError, "not a task signature"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("make", "error", "named"), [pytest.param(m, e, n, id=i) for i, m, e, n in REFUSED]
)
def test_refused_with_a_clear_error_naming_it_and_nothing_appended(
    relay: Relay, make: Any, error: type[RelayError], named: str
) -> None:
    with pytest.raises(error, match=named.replace("(", r"\(").replace(")", r"\)")) as caught:
        relay.send(*make())
    assert isinstance(caught.value, RelayError) and isinstance(caught.value, ValueError)
    assert relay.wal().next_lsn() == 0


@pytest.mark.parametrize(
    ("key", "order_key"),
    [(7, None), ("", None), ("k" * 257, None), ("a\ud800", None), (None, b"x"), (None, "")],
)
def test_bad_keys_are_refused(relay: Relay, key: Any, order_key: Any) -> None:
    with pytest.raises(SendError, match="key"):
        relay.send(reserve.s(ORDER), key=key, order_key=order_key)
    assert relay.wal().next_lsn() == 0


def test_a_queue_missing_from_task_queues_is_refused_when_celery_would(tmp_path: Path) -> None:
    app = Celery("strict", set_as_current=False)
    app.conf.task_create_missing_queues = False

    @app.task(name="strict.t")
    def task() -> None: ...

    strict = Relay(app, str(tmp_path / "wal"), settings=RelaySettings(), wal_options=fast())
    try:
        with pytest.raises(UnsupportedOptionError, match="queue"):
            strict.send(task.s().set(queue="nowhere"))
        assert strict.wal().next_lsn() == 0
        assert strict.send(task.s()).lsn == 0  # the default queue is declared
    finally:
        strict.close()


# ------------------------------------------------------------------ walstore's errors
def test_walstore_errors_pass_through_unchanged(tmp_path: Path) -> None:
    seg = 8192
    small = Relay(shop, str(tmp_path / "wal"), settings=RelaySettings(),
                  wal_options=fast(segment_bytes=seg, max_bytes=2 * seg,
                                   max_record_bytes=1024))  # fmt: skip
    try:
        with pytest.raises(RecordTooLargeError):
            small.send(reserve.s("x" * 2000), key="big")
        assert small.wal().next_lsn() == 0
        assert small.send(reserve.s("small"), key="big").lsn == 0  # the key was not taken
        with pytest.raises(LogFullError):
            for i in range(1000):
                small.send(reserve.s(ORDER), key=f"k{i}")
        full_at = small.wal().next_lsn()
        with pytest.raises(LogFullError):
            small.send(reserve.s(ORDER), key="after")
        assert small.wal().next_lsn() == full_at
    finally:
        small.close()
