"""Dead letters: durable files under the WAL, listed, replayed into the log, purged."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from walrelay.deadletters import DeadLetter, DeadLetterStore
from walrelay.errors import DeadLetterNotFoundError
from walrelay.record import Entry, TaskSpec, decode
from walstore import Options, SyncPolicy, Wal

pytestmark = pytest.mark.timeout(30)

ENTRY = Entry("p1", (TaskSpec("warehouse", "tasks.w", "warehouse", [1]),))


def letter(lsn: int, payload: bytes = ENTRY.encode()) -> DeadLetter:
    targets = {"warehouse": {"attempts": 5, "error": "boom"}}
    return DeadLetter(lsn, "a" * 32, "p1", payload, targets, "exhausted", 1234.5)


def test_add_list_get_remove(tmp_path: Path) -> None:
    store = DeadLetterStore(str(tmp_path))
    assert store.list() == []
    store.add(letter(12))
    store.add(letter(3, b"\xff\x00 binary"))
    assert [d.id for d in store.list()] == ["3", "12"]
    assert store.get("12") == letter(12)
    assert store.get("3").payload == b"\xff\x00 binary"
    mode = os.stat(tmp_path / "deadletters" / f"{12:020d}.json").st_mode
    assert stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "deadletters").st_mode) == 0o700
    store.remove("12")
    assert [d.id for d in store.list()] == ["3"]
    with pytest.raises(DeadLetterNotFoundError):
        store.remove("12")
    with pytest.raises(DeadLetterNotFoundError):
        store.get("../../etc/passwd")
    assert not [n for n in os.listdir(tmp_path / "deadletters") if n.endswith(".tmp")]


def test_replay_appends_the_entry_and_forgets_the_letter(tmp_path: Path) -> None:
    store = DeadLetterStore(str(tmp_path / "wal"))
    with Wal.open(tmp_path / "wal", Options(sync=SyncPolicy.NONE, segment_bytes=8192)) as wal:
        wal.append(b"first")
        store.add(letter(0))
        lsn = store.replay("0", wal)
        assert lsn == 1
        records = list(wal.iter_from(1))
    assert decode(records[0][1]) == ENTRY
    assert store.list() == []


def test_an_undecodable_letter_cannot_be_replayed(tmp_path: Path) -> None:
    store = DeadLetterStore(str(tmp_path / "wal"))
    store.add(letter(4, b"garbage"))
    with Wal.open(tmp_path / "wal", Options(sync=SyncPolicy.NONE, segment_bytes=8192)) as wal:
        with pytest.raises(ValueError, match="purge it"):
            store.replay("4", wal)
        assert wal.next_lsn() == 0
    assert [d.id for d in store.list()] == ["4"]
