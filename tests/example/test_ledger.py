"""The ledger: the first delivery writes the effect, repeats only count, several worker
processes can write to one SQLite file at once."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path
from typing import Any

import pytest

from tasks.ledger import Ledger, ledger_for, status_of
from tests.support.postgres import private_database

pytestmark = pytest.mark.timeout(60)


def test_a_repeated_delivery_changes_nothing_but_the_count(tmp_path: Path) -> None:
    book = Ledger(f"sqlite:///{tmp_path / 'sub' / 'ledger.db'}")  # parent dir is created
    book.record("warehouse", "p1", {"items": [{"sku": "a", "qty": 1}]})
    book.record("warehouse", "p1", {"items": [{"sku": "CHANGED", "qty": 9}]})
    book.record("finance", "p1", {"total_cents": 5})
    assert book.deliveries("p1") == {"warehouse": 2, "finance": 1}
    assert book.detail("warehouse", "p1") == {"items": [{"sku": "a", "qty": 1}]}
    assert book.snapshot() == {"warehouse": {"p1": 2}, "finance": {"p1": 1}}
    assert book.deliveries("nope") == {}
    book.close()


def test_snapshot_always_names_both_targets(tmp_path: Path) -> None:
    book = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    assert book.snapshot() == {"warehouse": {}, "finance": {}}
    book.record("other", "x", {})
    assert book.snapshot()["other"] == {"x": 1}


def test_status_of_says_pending_or_done(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'l.db'}"
    ledger_for(url).record("finance", "p9", {})
    assert status_of("p9", url) == {"warehouse": "pending", "finance": "done"}


def _writer(url: str, worker: int, keys: int) -> None:
    book = Ledger(url)
    for k in range(keys):
        book.record("warehouse", f"k{k}", {"by": worker})


def test_several_processes_write_one_sqlite_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(url, w, 40)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(50)
        assert p.exitcode == 0
    assert Ledger(url).snapshot()["warehouse"] == {f"k{k}": 4 for k in range(40)}


def _open_at(url: str, barrier: Any) -> None:
    barrier.wait(30)
    Ledger(url).close()


def test_workers_starting_together_on_a_new_postgresql_database_all_open_the_ledger() -> None:
    """Several worker processes open a ledger whose table does not exist yet, at the same
    moment: in PostgreSQL ``CREATE TABLE IF NOT EXISTS`` is not safe against itself (one
    of two at once fails on pg_type's unique index), and a worker failed to start."""
    ctx = mp.get_context("fork")
    for _round in range(4):
        with private_database("walrelay_ledger") as url:
            barrier = ctx.Barrier(6)
            procs = [ctx.Process(target=_open_at, args=(url, barrier)) for _ in range(6)]
            for p in procs:
                p.start()
            for p in procs:
                p.join(50)
            assert [p.exitcode for p in procs] == [0] * 6
            book = Ledger(url)
            try:
                assert book.snapshot() == {"warehouse": {}, "finance": {}}
            finally:
                book.close()
