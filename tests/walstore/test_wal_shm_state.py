"""The shared write region as every process reads it: each mapping remembers the last
region it verified or wrote, and must still see every other process's update and every
damage at once (walstore.shm.SharedState.write_state)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from walstore.shm import _SELECTOR_OFF, _WRITE_OFFS, SharedState, TornStateError, WriteState

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


@pytest.mark.parametrize("where", [0, 20, 55, 56, 59], ids=lambda w: f"byte{w}")
def test_damage_after_a_read_is_seen_by_the_next_read(tmp_path: Path, where: int) -> None:
    one, two = SharedState(str(tmp_path / "shm")), SharedState(str(tmp_path / "shm"))
    try:
        state = WriteState(0, 7, 0, 64, 10, 0, 0, 0)
        one.set_write(state)
        assert one.write_state() == two.write_state() == state
        off = _selected(one) + where  # 56-59: the stored checksum itself
        one._mm[off] ^= 0x5A
        for shm in (one, two):
            with pytest.raises(TornStateError):
                shm.write_state()
        one._mm[off] ^= 0x5A
        assert one.write_state() == two.write_state() == state
    finally:
        one.close()
        two.close()


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["write1", "write2", "read", "damage"]), STATES,
                          st.integers(0, 59)), max_size=40))  # fmt: skip
def test_every_read_is_the_last_write_or_torn(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, WriteState, int]]
) -> None:
    """Model: the region is the last state written, unless damaged since; two mappings
    write and read in any order."""
    path = str(tmp_path_factory.mktemp("shm") / "shm")
    one, two = SharedState(path), SharedState(path)
    try:
        initial = WriteState(0, 1, 0, 64, 1, 0, 0, 0)
        one.set_write(initial)
        last, flipped = (
            initial,
            set[int](),
        )  # bytes of the selected copy flipped an odd number of times
        for op, state, where in ops:
            if op in ("write1", "write2"):
                (one if op == "write1" else two).set_write(state)
                last, flipped = state, set()
            elif op == "damage":
                one._mm[_selected(one) + where] ^= 0xFF
                flipped ^= {where}
            else:
                for shm in (one, two):
                    if flipped:
                        with pytest.raises(TornStateError):
                            shm.write_state()
                    else:
                        assert shm.write_state() == last
    finally:
        one.close()
        two.close()
