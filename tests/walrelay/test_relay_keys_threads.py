"""Keyed sends from threads of several processes at once (review 4: the key index's
POSIX record locks belong to the process, so the kernel took waits of different threads
for a deadlock and failed sends with EDEADLK: a bare OSError from ``relay.send``, and a
503 from the web app for a purchase that was committed)."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.walrelay.shop_tasks import audit, reserve
from tests.walrelay.test_relay_keys import make

PROCESSES, THREADS, SECONDS = 2, 8, 4.0


def _sender(wal_dir: str, stop: float, out: Any) -> None:
    relay = make(Path(wal_dir))
    sent, errors = [0], Counter[str]()
    lock = threading.Lock()

    def run() -> None:
        while time.time() < stop:
            key = uuid.uuid4().hex
            try:
                relay.send(reserve.s({"o": key}), audit.s({"o": key}), key=key)
            except Exception as exc:  # any error fails the test: counted, reported
                with lock:
                    errors[f"{type(exc).__name__}: {exc}"] += 1
            else:
                with lock:
                    sent[0] += 1

    threads = [threading.Thread(target=run) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    relay.close()
    out.put((sent[0], dict(errors)))


@pytest.mark.timeout(120)
def test_keyed_sends_from_threads_of_several_processes_never_fail(tmp_path: Path) -> None:
    wal_dir = tmp_path / "wal"
    make(wal_dir).close()  # the log and the key index exist before the race
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    stop = time.time() + SECONDS
    procs = [ctx.Process(target=_sender, args=(str(wal_dir), stop, out)) for _ in range(PROCESSES)]
    for p in procs:
        p.start()
    results = [out.get(timeout=90) for _ in procs]
    for p in procs:
        p.join(30)
    errors = sum((Counter(e) for _, e in results), Counter[str]())
    assert not errors, errors
    sent = sum(n for n, _ in results)
    assert sent > 100
    relay = make(wal_dir)
    try:
        assert sum(1 for _ in relay.wal().iter_from(0)) == sent  # one record per send
    finally:
        relay.close()


def _child_sends(wal_dir: str, out: Any) -> None:
    relay = make(Path(wal_dir))
    try:
        out.put(relay.send(reserve.s({"o": "child"}), key="child").lsn)
    except Exception as exc:  # any error fails the test: reported
        out.put(repr(exc))
    finally:
        relay.close()


@pytest.mark.timeout(60)
def test_a_forked_child_lets_go_of_the_parents_lock_descriptor(tmp_path: Path) -> None:
    """An open file description lock lives while any descriptor of it does: a child
    keeping the parent's would keep a stripe the parent held at the fork locked after
    the parent died. The child drops it and sends through an index of its own."""
    from walrelay import keys

    relay = make(tmp_path / "wal")
    try:
        first = relay.send(reserve.s({"o": "parent"}), key="parent")
        parent_index = keys.index_for(relay.wal())
        ctx = mp.get_context("fork")
        out = ctx.Queue()
        child = ctx.Process(target=_child_sends, args=(str(tmp_path / "wal"), out))
        child.start()
        assert out.get(timeout=30) == first.lsn + 1
        child.join(30)
        assert child.exitcode == 0
        assert not parent_index.closed  # the parent's index is the parent's still
        again = relay.send(reserve.s({"o": "parent"}), key="parent")
        assert again == first
    finally:
        relay.close()
