"""The group-commit gate on its own: the flush word (a futex on the shared mapping,
walstore.futex) and the write lock that bumps it and wakes every follower on release.

Each ``SharedState`` here maps the file separately, as two processes do: a futex on a
shared file mapping is keyed by the file and offset, not by the mapping. (The protocol
built on them is tested as a state machine in test_wal_group_commit.py.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from walstore.shm import SharedState, WriteLock

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def states(tmp_path: Path) -> Iterator[list[SharedState]]:
    made = [SharedState(str(tmp_path / "shm")) for _ in range(2)]
    made[0].reset_slot(0)  # a slot in use: releases of the write lock wake followers
    yield made
    for state in made:
        state.close()


def sleeper(state: SharedState, seen: int, timeout: float = 10.0) -> threading.Event:
    done = threading.Event()

    def run() -> None:
        state.flush_word.wait(seen, timeout)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    return done


def test_wait_returns_at_once_when_the_word_moved_on(states: list[SharedState]) -> None:
    a, b = states
    seen = a.flush_word.value
    b.flush_word.bump()  # another process bumped it since we looked
    started = time.monotonic()
    a.flush_word.wait(seen, 5.0)
    assert time.monotonic() - started < 1.0  # no lost wake-up between check and sleep


def test_a_sleeper_wakes_on_wake_all_and_not_before(states: list[SharedState]) -> None:
    a, b = states
    seen = a.flush_word.value
    done = [sleeper(a, seen) for _ in range(3)]
    assert not any(d.wait(0.3) for d in done)
    b.flush_word.bump()
    b.flush_word.wake_all()
    assert all(d.wait(5) for d in done)  # every follower, at once


def test_a_wait_is_bounded_by_its_timeout(states: list[SharedState]) -> None:
    """A leader killed before waking anyone delays followers by the timeout, no more."""
    a, _ = states
    started = time.monotonic()
    a.flush_word.wait(a.flush_word.value, 0.2)
    assert 0.15 < time.monotonic() - started < 2.0


def test_releasing_the_write_lock_wakes_followers(
    tmp_path: Path, states: list[SharedState]
) -> None:
    a, b = states
    lead = WriteLock(str(tmp_path / "append.lock"), a)
    follower = WriteLock(str(tmp_path / "append.lock"), b)
    try:
        assert lead.acquire(blocking=False)
        seen = b.flush_word.value
        assert not follower.acquire(blocking=False)  # a flush is under way
        done = sleeper(b, seen)
        assert not done.wait(0.3)
        lead.release()
        assert done.wait(5)
        assert follower.acquire(blocking=False)  # and the lock is free to lead the next
        follower.release()
    finally:
        lead.close()
        follower.close()


def test_a_leader_that_dies_leaves_nothing_held(tmp_path: Path, states: list[SharedState]) -> None:
    a, b = states
    dying = WriteLock(str(tmp_path / "append.lock"), a)
    other = WriteLock(str(tmp_path / "append.lock"), b)
    try:
        assert dying.acquire(blocking=False)
        dying.close()  # what the kernel does to a killed process's descriptors
        assert other.acquire(blocking=False)
        other.release()
    finally:
        other.close()
