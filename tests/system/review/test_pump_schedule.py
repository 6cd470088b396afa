"""Attack: options that relay.send accepts and records are not honoured by the pump.

docs/api.md: ``countdown``/``eta`` are "held by the pump and published when due, not as a
broker ETA"; ``expires`` is carried; ``order_key``: "records sharing an order key are
published one at a time in LSN order, the next only after the previous is confirmed".
Observed: every record is published at once (countdown=30 runs 0.1 s after the send, an
eta in 9999 too), ``expires`` never reaches the worker (a task that expired in 2000
runs), and two records of one order key run concurrently."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest

from tests.support.stack import CELERY, Stack, wait_until
from tests.system.review.attack_app import app as attack_app
from tests.system.review.attack_app import note
from walrelay import Relay, RelaySettings
from walstore import Options

pytestmark = pytest.mark.timeout(180)
APP = "tests.system.review.attack_app"


def relay_of(stack: Stack) -> Relay:
    return Relay(attack_app, str(stack.wal_dir), settings=RelaySettings(wal_dir=str(stack.wal_dir)),
                 wal_options=Options.from_env(stack.env()))  # fmt: skip


def doc(out: Path, tid: str) -> dict[str, Any] | None:
    path = out / f"{tid}.json"
    return json.loads(path.read_text()) if path.exists() else None


def start(stack: Stack, tmp_path: Path, concurrency: int = 1, **env: Any) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    env = {"ATTACK_OUT": str(out), **env}
    stack.start_worker(concurrency=concurrency, queues="celery", app=APP, env=env)
    pump = stack.spawn("pump", [CELERY, "-A", APP, "pump"], env)
    wait_until("pump started", lambda: "resuming at LSN" in stack.log_of(pump), 60)
    return out


def test_a_countdown_is_held_until_due(stack: Stack, tmp_path: Path) -> None:
    out = start(stack, tmp_path)
    relay = relay_of(stack)
    try:
        sent_at = time.time()
        later = relay.send(note.s("later").set(countdown=30))
        far = relay.send(note.s("far").set(eta=cast(Any, "9999-12-31T00:00:00+00:00")))
        now = relay.send(note.s("now"))
    finally:
        relay.close()
    wait_until("the immediate task ran", lambda: doc(out, now.task_ids[0]), 60, 0.2)
    time.sleep(3)
    early = {d["tag"]: round(d["started"] - sent_at, 1)
             for t in later.task_ids + far.task_ids if (d := doc(out, t))}  # fmt: skip
    assert not early, f"ran before due (seconds after the send): {early}"


def test_an_expired_task_does_not_run(stack: Stack, tmp_path: Path) -> None:
    out = start(stack, tmp_path)
    relay = relay_of(stack)
    try:
        stale = relay.send(note.s("stale").set(expires=datetime(2000, 1, 1, tzinfo=UTC)))
        fresh = relay.send(note.s("fresh"))
    finally:
        relay.close()
    wait_until("the fresh task ran", lambda: doc(out, fresh.task_ids[0]), 60, 0.2)
    time.sleep(2)
    assert doc(out, stale.task_ids[0]) is None, "a task that expired in 2000 was executed"


def test_an_order_key_serialises_its_records(stack: Stack, tmp_path: Path) -> None:
    out = start(stack, tmp_path, concurrency=2)
    relay = relay_of(stack)
    try:
        first = relay.send(note.s("first", secs=4), order_key="customer-7")
        second = relay.send(note.s("second"), order_key="customer-7")
    finally:
        relay.close()
    ids = first.task_ids + second.task_ids
    wait_until("both ran", lambda: all(doc(out, t) for t in ids), 60, 0.2)
    one, two = doc(out, ids[0]), doc(out, ids[1])
    assert one and two
    assert two["started"] >= one["ended"], (
        f"the second record of order key customer-7 started {one['ended'] - two['started']:.1f}s "
        "before the first was done"
    )
