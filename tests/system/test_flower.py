"""Flower shows the tasks the pump published, by the ids ``walrelay.record.task_id`` derives,
with the purchase id in their arguments: a private redis-server, a real worker, the real
pump and ``celery -A worker flower``, read through Flower's HTTP API."""

from __future__ import annotations

import httpx
import pytest

from tests.support.flower_stack import USER, run_purchases_under_flower
from tests.support.stack import Stack

pytestmark = [pytest.mark.slow]


@pytest.mark.timeout(150)
def test_flower_lists_the_pumps_tasks_with_their_purchase(stack: Stack) -> None:
    flower, expected = run_purchases_under_flower(stack, count=3)
    seen = flower.tasks()
    assert set(seen) == {t.task_id for t in expected}  # nothing else, nothing twice
    for t in expected:
        task = seen[t.task_id]
        assert task["name"] == t.name, t
        assert task["state"] == "SUCCESS", t
        assert str(task["worker"]).startswith("w"), t  # the stack's worker ran it
        # argsrepr, as the pump set it: the purchase with its id, readable in Flower.
        assert f'"purchase_id":"{t.purchase_id}"' in str(task["args"]), task["args"]

    # Flower's search finds a purchase's two tasks by its id (it searches the args).
    one = expected[0].purchase_id
    found = flower.tasks(search=one)
    assert set(found) == {t.task_id for t in expected if t.purchase_id == one}
    assert {str(task["name"]) for task in found.values()} == {t.name for t in expected}

    # The task page and the task-info API show the purchase too.
    first = expected[0]
    info = flower.get(f"/api/task/info/{first.task_id}")
    assert info.status_code == 200 and info.json()["state"] == "SUCCESS"
    assert first.purchase_id in info.json()["args"]
    page = flower.get(f"/task/{first.task_id}")
    assert page.status_code == 200
    assert first.purchase_id in page.text and first.task_id in page.text

    # Behind basic auth, as docker-compose runs it: no credentials, no tasks.
    anonymous = httpx.get(f"{flower.url}/api/tasks", timeout=10)
    assert anonymous.status_code == 401
    assert USER not in anonymous.text
