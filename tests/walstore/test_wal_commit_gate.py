"""The group-commit gate (walstore.shm.CommitGate) on its own.

Each ``CommitGate`` here opens its own descriptors, so for flock(2) the three of them are
as separate as three processes; they share one ``SharedState`` as processes share ``shm``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from walstore.shm import CommitGate, SharedState

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def gates(tmp_path: Path) -> Iterator[list[CommitGate]]:
    state = SharedState(str(tmp_path / "shm"))
    paths = [str(tmp_path / f"gate{i}.lock") for i in range(2)]
    made = [CommitGate(str(tmp_path / "sync.lock"), paths, state) for _ in range(3)]
    yield made
    for gate in made:
        gate.close()
    state.close()


def waiter(gate: CommitGate) -> threading.Event:
    done = threading.Event()

    def run() -> None:
        gate.wait()
        done.set()

    threading.Thread(target=run, daemon=True).start()
    return done


def test_one_leader_at_a_time_and_no_wait_without_one(gates: list[CommitGate]) -> None:
    a, b, _ = gates
    assert waiter(b).wait(5)  # no flush in progress: wait returns at once
    assert a.try_lead()
    assert not b.try_lead()
    a.end_lead()
    assert b.try_lead()
    b.end_lead()


def test_a_waiter_sleeps_until_the_flush_ends(gates: list[CommitGate]) -> None:
    a, b, _ = gates
    assert a.try_lead()
    done = waiter(b)
    assert not done.wait(0.3)
    a.end_lead()
    assert done.wait(5)


def test_the_next_leader_does_not_hold_the_last_flush_s_waiters(gates: list[CommitGate]) -> None:
    """The waiters of flush n are free to go once it ends, even though flush n+1 has
    begun: it is on the other gate. (With a single gate, the next leader could take it
    back before they ran, and records already durable waited through another flush.)"""
    a, b, c = gates
    assert a.try_lead()
    done = waiter(b)
    assert not done.wait(0.3)
    a.end_lead()
    assert c.try_lead()  # flush n+1 starts at once
    try:
        assert done.wait(5), "a waiter of the finished flush is held by the next one"
        # Whoever starts waiting now waits for flush n+1.
        late = waiter(b)
        assert not late.wait(0.3)
    finally:
        c.end_lead()
    assert late.wait(5)


def test_a_leader_that_dies_leaves_nothing_held(tmp_path: Path) -> None:
    """A process killed while leading drops its flocks with its descriptors; the
    sequence number it did not advance is harmless."""
    state = SharedState(str(tmp_path / "shm"))
    paths = [str(tmp_path / f"gate{i}.lock") for i in range(2)]
    dying = CommitGate(str(tmp_path / "sync.lock"), paths, state)
    other = CommitGate(str(tmp_path / "sync.lock"), paths, state)
    try:
        assert dying.try_lead()
        seq = state.flush_seq()
        dying.close()  # what the kernel does to a killed process's descriptors
        started = time.monotonic()
        other.wait()
        assert time.monotonic() - started < 1
        assert other.try_lead()
        assert state.flush_seq() == seq
        other.end_lead()
        assert state.flush_seq() == seq + 1
    finally:
        other.close()
        state.close()
