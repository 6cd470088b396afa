"""A send goes where Celery's own router sends it at that moment: routes that look at
the arguments, expiries counted from each send, each send's own headers, and routing
that changes after the first send (a routing cache tried on 2026-11-30 missed the last
two; review tests)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from walrelay import Relay, RelaySettings
from walrelay.record import Entry, decode
from walrelay.signatures import task_specs
from walstore import Options, SyncPolicy

pytestmark = pytest.mark.timeout(60)


def _relay(app: Celery, tmp_path: Path) -> Relay:
    options = Options(sync=SyncPolicy.NONE, segment_bytes=1 << 20)
    return Relay(app, str(tmp_path / "wal"), settings=RelaySettings(), wal_options=options)


def _entries(relay: Relay) -> list[Entry]:
    return [decode(payload) for _lsn, payload in relay.wal().iter_from(0)]


@pytest.fixture
def mapped(tmp_path: Path) -> Iterator[tuple[Celery, Relay]]:
    app = Celery("mapped", broker="memory://", set_as_current=False)
    app.conf.task_routes = {
        "m.stock": {"queue": "stock", "headers": {"source": "web"}},
        "m.audit.*": {"queue": "audit", "priority": 3},
    }

    @app.task(name="m.stock", shared=False)
    def stock(n: int) -> int:
        return n

    @app.task(name="m.audit.note", shared=False, expires=60)
    def note(n: int) -> int:
        return n

    relay = _relay(app, tmp_path)
    yield app, relay
    relay.close()


def test_each_send_gets_the_route_and_its_own_headers(mapped: tuple[Celery, Relay]) -> None:
    app, relay = mapped
    stock = app.tasks["m.stock"]
    for n in range(3):
        relay.send(stock.s(n))
    entries = _entries(relay)
    assert [e.tasks[0].queue for e in entries] == ["stock"] * 3
    assert [e.tasks[0].args for e in entries] == [[0], [1], [2]]
    for e in entries:
        assert e.tasks[0].options == {"exchange": "", "routing_key": "stock",
                                      "headers": {"source": "web"}}  # fmt: skip
    # Each send gets its own options: changing one send's headers changes no other's.
    first, second = (task_specs(app, (stock.s(n),), time.time())[0] for n in (4, 5))
    first.options["headers"]["source"] = "changed"
    assert second.options["headers"] == {"source": "web"}
    assert task_specs(app, (stock.s(6),), time.time())[0].options["headers"] == {"source": "web"}


def test_a_routed_expiry_counts_from_each_send(
    mapped: tuple[Celery, Relay],
) -> None:
    app, relay = mapped
    note = app.tasks["m.audit.note"]
    relay.send(note.s(1))
    time.sleep(0.05)
    relay.send(note.s(2))
    first, second = (e.tasks[0] for e in _entries(relay))
    assert second.options["expires"] - first.options["expires"] >= 0.04
    assert first.options["priority"] == second.options["priority"] == 3


def test_options_on_the_signature_win_for_that_send_only(mapped: tuple[Celery, Relay]) -> None:
    app, relay = mapped
    stock = app.tasks["m.stock"]
    relay.send(stock.s(1))
    relay.send(stock.s(2).set(queue="audit"))
    relay.send(stock.s(3))
    assert [e.tasks[0].queue for e in _entries(relay)] == ["stock", "audit", "stock"]


def test_a_router_function_sees_the_arguments_of_every_send(tmp_path: Path) -> None:
    app = Celery("byargs", broker="memory://", set_as_current=False)

    def by_size(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any
                ) -> dict[str, str]:  # fmt: skip
        return {"queue": "big" if args and args[0] > 10 else "small"}

    app.conf.task_routes = (by_size,)

    @app.task(name="b.work", shared=False)
    def work(n: int) -> int:
        return n

    relay = _relay(app, tmp_path)
    try:
        for n in (1, 50, 2, 99):
            relay.send(work.s(n))
        assert [e.tasks[0].queue for e in _entries(relay)] == ["small", "big", "small", "big"]
    finally:
        relay.close()


def test_a_default_queue_changed_after_the_first_send_is_followed(tmp_path: Path) -> None:
    app = Celery("dq", broker="memory://", set_as_current=False)

    @app.task(name="d.plain", shared=False)
    def plain(n: int) -> int:
        return n

    relay = _relay(app, tmp_path)
    try:
        relay.send(plain.s(1))
        app.conf.task_default_queue = "elsewhere"  # Celery's router reads it on every route
        relay.send(plain.s(2))
        assert [e.tasks[0].queue for e in _entries(relay)] == ["celery", "elsewhere"]
    finally:
        relay.close()


def test_a_route_changed_in_place_after_the_first_send_is_followed(tmp_path: Path) -> None:
    routes: dict[str, dict[str, Any]] = {"c.plain": {"queue": "one", "headers": {"a": 1}}}
    app = Celery("inplace", broker="memory://", set_as_current=False)
    app.conf.task_routes = routes

    @app.task(name="c.plain", shared=False)
    def plain(n: int) -> int:
        return n

    relay = _relay(app, tmp_path)
    try:
        relay.send(plain.s(1))
        routes["c.plain"]["queue"] = "two"  # Celery's MapRoute holds this very dict
        routes["c.plain"]["headers"]["b"] = 2
        relay.send(plain.s(2))
        last = _entries(relay)[-1].tasks[0]
        assert (last.queue, last.options.get("headers")) == ("two", {"a": 1, "b": 2})
    finally:
        relay.close()
