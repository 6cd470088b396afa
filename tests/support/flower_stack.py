"""Flower against a test pipeline: start ``celery -A worker flower`` on a free loopback port
(basic auth, as docker-compose runs it), run purchases through real workers and the real
pump, and know which tasks Flower must show for them.

Named ``flower_stack`` (not ``flower``): this directory is on sys.path in tests and
must not shadow the Flower package.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from tests.support.stack import Stack, wait_until
from tools.processes import Proc
from tools.roles import start_flower as start_flower_process
from walrelay.record import decode, task_id
from walstore import Options, Wal

USER, PASSWORD = "watcher", "test-only-password"


@dataclass(frozen=True)
class ExpectedTask:
    """A task the pump must have published for a purchase (what Flower should list)."""

    task_id: str
    name: str
    purchase_id: str
    target: str


@dataclass
class FlowerServer:
    proc: Proc

    @property
    def url(self) -> str:
        return self.proc.url

    def get(self, path: str, **params: str) -> httpx.Response:
        return httpx.get(self.url + path, params=params, auth=(USER, PASSWORD), timeout=10)

    def tasks(self, **params: str) -> dict[str, dict[str, object]]:
        response = self.get("/api/tasks", **params)
        assert response.status_code == 200, response.text
        tasks: dict[str, dict[str, object]] = response.json()
        return tasks


def start_flower(stack: Stack) -> FlowerServer:
    """Flower on a free port, ready and subscribed to the task events.

    Start it before any worker: on Redis, events are pub/sub messages, and whatever was
    published before Flower subscribed is not shown (nor is it stored anywhere)."""
    auth = {"FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}"}
    server = FlowerServer(start_flower_process(stack.processes, env=auth))
    # Flower's event receiver PSUBSCRIBEs to the celeryev fanout; no worker runs yet, so
    # a pattern subscription on the server is Flower's.
    client = stack.redis.client()
    wait_until("flower subscribed to events", lambda: client.pubsub_numpat() >= 1, 30, 0.05)
    return server


def expected_tasks(stack: Stack) -> list[ExpectedTask]:
    """Every task of every entry in the stack's log, with the id the pump gives it."""
    with Wal.open(stack.wal_dir, Options.from_env(stack.env())) as wal:
        out = []
        for lsn, payload in wal.iter_from(0):
            entry = decode(payload)
            for spec in entry.tasks:
                tid = task_id(wal.wal_id, lsn, spec.target)
                out.append(ExpectedTask(tid, spec.name, entry.key or "", spec.target))
        return out


def run_purchases_under_flower(
    stack: Stack, count: int = 3
) -> tuple[FlowerServer, list[ExpectedTask]]:
    """Flower, a worker and the pump; ``count`` purchases recorded and, as Flower's API
    reports, succeeded. Returns Flower and the tasks it shows."""
    flower = start_flower(stack)
    stack.start_worker()
    stack.start_pump()
    ids = stack.produce(1, count, prefix="order")
    expected = expected_tasks(stack)
    assert sorted({t.purchase_id for t in expected}) == sorted(ids)
    assert {t.target for t in expected} == {"0", "1"}  # relay.send numbers a record's tasks

    def all_succeeded() -> bool:
        seen = flower.tasks()
        return all(seen.get(t.task_id, {}).get("state") == "SUCCESS" for t in expected)

    wait_until("flower shows every task succeeded", all_succeeded, 60, 0.25)
    return flower, expected
