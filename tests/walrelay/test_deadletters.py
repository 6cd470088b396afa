"""Dead letters: durable files under the WAL, listed, replayed into the log, purged."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

import pytest

from tests.support.faultfs import FaultFs, SimulatedCrash
from walrelay.deadletters import DeadLetter, DeadLetterStore
from walrelay.errors import DeadLetterNotFoundError
from walrelay.record import Entry, TaskSpec, decode
from walstore import Options, SyncPolicy, Wal
from walstore.fs import OsFs

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


def test_a_failed_write_leaves_neither_the_letter_nor_a_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = DeadLetterStore(str(tmp_path))
    store.add(letter(1))

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="injected"):
        store.add(letter(2))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "deadletters")) == [f"{1:020d}.json"]
    assert [d.id for d in store.list()] == ["1"]


def test_dead_letters_and_their_removal_survive_a_power_cut(tmp_path: Path) -> None:
    fs = FaultFs()
    store = DeadLetterStore(str(tmp_path), fs=fs)
    store.add(letter(7))
    store.add(letter(8))
    fs.crash()
    assert [d.id for d in store.list()] == ["7", "8"]
    assert store.get("7") == letter(7)
    store.remove("7")
    fs.crash()
    assert [d.id for d in store.list()] == ["8"]


@pytest.mark.parametrize("step", range(1, 6))
def test_a_crash_at_any_step_of_add_leaves_the_whole_letter_or_nothing(
    tmp_path: Path, step: int
) -> None:
    fs = FaultFs()
    store = DeadLetterStore(str(tmp_path), fs=fs)
    store.add(letter(1))
    fs.kill_after(step)
    with contextlib.suppress(SimulatedCrash):
        store.add(letter(2, b"second"))
    fs.crash()
    assert [d.id for d in store.list()] in (["1"], ["1", "2"])
    if len(store.list()) == 2:
        assert store.get("2") == letter(2, b"second")
    assert not [n for n in os.listdir(tmp_path / "deadletters") if n.endswith(".tmp")]


def test_a_new_dead_letter_directory_is_made_durable_in_the_wal_directory(
    tmp_path: Path,
) -> None:
    synced: list[str] = []

    class Spy(OsFs):
        def fsync_dir(self, path: str) -> None:
            synced.append(os.path.abspath(path))
            super().fsync_dir(path)

    DeadLetterStore(str(tmp_path / "wal"), fs=Spy()).add(letter(1))
    assert synced[0] == str(tmp_path / "wal")  # the entry of deadletters/ in WAL_DIR
    assert str(tmp_path / "wal" / "deadletters") in synced  # the letter's entry
