"""The shared write region as every process reads it: each mapping remembers the last
region it verified or wrote, and must still see every other process's update and every
damage at once (walstore.shm.SharedState.write_state)."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from walstore import Options, Wal, WalError
from walstore.shm import (
    _SELECTOR_OFF,
    _SLOT_DATA,
    _WRITE_OFFS,
    SLOT_COUNT,
    SLOT_READY,
    SLOT_WRITTEN,
    SharedState,
    TornStateError,
    WriteState,
    _slot_off,
)

U32 = st.integers(0, 2**32 - 1)
U63 = st.integers(0, 2**63 - 1)
STATES = st.builds(WriteState, U63, U32, st.integers(0, 2), U63, U63, U63, U63, U63)


def _selected(shm: SharedState) -> int:
    return _WRITE_OFFS[shm._mm[_SELECTOR_OFF] & 1]


def test_a_mapping_sees_what_another_wrote_after_it_read(tmp_path: Path) -> None:
    one, two = SharedState(str(tmp_path / "shm")), SharedState(str(tmp_path / "shm"))
    try:
        first = WriteState(0, 7, 0, 64, 10, 0, 0, 0)
        second = first._replace(offset=340, next_lsn=11)
        one.set_write(first)
        assert two.write_state() == first  # now remembered by two
        one.set_write(second)
        assert two.write_state() == second
        one.set_write(first)  # the same bytes as two remembers, in the other copy
        assert two.write_state() == first
    finally:
        one.close()
        two.close()


@pytest.mark.parametrize("where", [0, 20, 55, 56, 59, 60, 63], ids=lambda w: f"byte{w}")
def test_damage_after_a_read_is_seen_by_the_next_read(tmp_path: Path, where: int) -> None:
    one, two = SharedState(str(tmp_path / "shm")), SharedState(str(tmp_path / "shm"))
    try:
        state = WriteState(0, 7, 0, 64, 10, 0, 0, 0)
        one.set_write(state)
        assert one.write_state() == two.write_state() == state
        off = _selected(one) + where  # 56-59: the generation, 60-63: the checksum
        one._mm[off] ^= 0x5A
        for shm in (one, two):
            with pytest.raises(TornStateError):
                shm.write_state()
        one._mm[off] ^= 0x5A
        assert one.write_state() == two.write_state() == state
    finally:
        one.close()
        two.close()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["write1", "write2", "read", "damage", "selector"]),
                          STATES, st.integers(0, 63)), max_size=40))  # fmt: skip
def test_every_read_is_the_last_write_or_torn(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, WriteState, int]]
) -> None:
    """Model: the region is the last state written, unless damaged since (a byte of the
    copy written last, or a selector that names the other copy); two mappings write and
    read in any order. Both at once (the last copy damaged, and the selector turned to
    the sound copy before it) cannot be told from that older state: then either is
    accepted."""
    path = str(tmp_path_factory.mktemp("shm") / "shm")
    one, two = SharedState(path), SharedState(path)
    try:
        one.set_write(WriteState(0, 1, 0, 64, 1, 0, 0, 0))
        last, current = one.write_state(), _selected(one)  # current: the copy written last
        held: dict[int, WriteState | None] = {72: None, 136: last}  # each copy's last write
        flipped = {72: set[int](), 136: set[int]()}  # bytes flipped an odd number of times
        for op, state, where in ops:
            if op in ("write1", "write2"):
                (one if op == "write1" else two).set_write(state)
                last, current = state, _selected(one)
                flipped[current], held[current] = set(), state
            elif op == "damage":  # a byte of whichever copy is selected now
                flipped[_selected(one)] ^= {where}
                one._mm[_selected(one) + where] ^= 0xFF
            elif op == "selector":
                one._mm[_SELECTOR_OFF] ^= 1
            else:
                selected = _selected(one)
                for shm in (one, two):
                    if selected == current and not flipped[current]:
                        assert shm.write_state() == last
                    elif selected != current and flipped[current] and not flipped[selected]:
                        with contextlib.suppress(TornStateError):  # the double fault
                            assert shm.write_state() == held[selected]
                    else:
                        with pytest.raises(TornStateError):
                            shm.write_state()
    finally:
        one.close()
        two.close()


@pytest.mark.parametrize("then", ["marked written", "left free"])
def test_a_slot_zeroed_while_its_producer_waits_is_an_unknown_outcome(
    tmp_path: Path, then: str
) -> None:
    """The shared state (a cache) overwritten with zeros under a waiting producer. If a
    leader then marks the slot written, the slot no longer says which LSNs: the producer
    was told LSN 0, a record it never appended. If nobody does (a free slot is neither
    written nor failed), the producer waited for ever. Now the outcome is unknown."""
    holder, waiter = Wal.open(tmp_path / "wal"), Wal.open(tmp_path / "wal")
    try:
        holder.append(b"first")
        wlock, shm = holder._writer._wlock, holder._writer._shm  # type: ignore[union-attr]
        pool = waiter._writer._pool  # type: ignore[union-attr]
        claimed = pool.get()  # its slot claimed now (a claim takes the write lock)
        assert claimed is not None
        pool.put(claimed)
        wlock.acquire()  # a flush under way: the waiter's append goes to a slot
        outcome: list[object] = []
        thread = threading.Thread(
            target=lambda: outcome.append(_attempt(waiter, b"second")), daemon=True
        )
        thread.start()
        deadline = time.monotonic() + 10
        ready: list[int] = []
        while not ready and time.monotonic() < deadline:
            ready = [s for s in range(SLOT_COUNT) if shm._mm[_slot_off(s)] == SLOT_READY]
            time.sleep(0.001)
        assert ready, "the waiter never filled a slot"
        (slot,) = ready
        shm._mm[_slot_off(slot) : _slot_off(slot) + _SLOT_DATA] = bytes(_SLOT_DATA)  # zeroed
        if then == "marked written":
            shm.set_slot_state(slot, SLOT_WRITTEN)
        wlock.release()
        thread.join(10)
        assert not thread.is_alive()
        (result,) = outcome
        assert isinstance(result, WalError), f"append returned {result!r}"
        assert "unknown" in str(result)
    finally:
        waiter.close()
        holder.close()


def _attempt(wal: Wal, payload: bytes) -> object:
    try:
        return wal.append(payload)
    except Exception as exc:
        return exc


@pytest.mark.parametrize("bit", [0, 1, 7])
def test_a_flipped_selector_never_brings_back_an_older_write_state(
    tmp_path: Path, bit: int
) -> None:
    """The selector picks which copy of the write region is current; the other is the
    one before it (often the intent of the last append), checksummed too. A flip that
    selects it made the next append zero an acknowledged record and reuse its LSN."""
    directory = tmp_path / "wal"
    acked: dict[int, bytes] = {}
    with Wal.open(directory, Options(min_free_bytes=0)) as wal:
        for i in range(5):
            acked[wal.append(b"before-%d" % i)] = b"before-%d" % i
        fd = os.open(directory / "shm", os.O_RDWR)
        try:
            os.pwrite(fd, bytes([os.pread(fd, 1, _SELECTOR_OFF)[0] ^ (1 << bit)]), _SELECTOR_OFF)
        finally:
            os.close(fd)
        for i in range(5):
            lsn = wal.append(b"after-%d" % i)
            assert lsn not in acked, f"LSN {lsn} handed out twice"
            acked[lsn] = b"after-%d" % i
    with Wal.open(directory) as wal:
        found = dict(wal.iter_from(wal.first_lsn()))
    assert {lsn: found.get(lsn) for lsn in acked} == acked
