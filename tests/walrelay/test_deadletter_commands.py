"""``deadletters replay ID`` and ``purge ID`` through the command, with ids that are not
LSNs and with a log that cannot take the entry: a one-line error, no traceback, and the
dead letters as they were."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from celery import Celery
from click.testing import CliRunner

from walrelay import Relay
from walrelay.commands.deadletters import deadletters
from walrelay.deadletters import DeadLetter, DeadLetterStore
from walrelay.record import Entry, TaskSpec
from walstore import LogFullError, Options, Wal

pytestmark = pytest.mark.timeout(30)


def letter(lsn: int, payload: bytes = b'{"v": 1}') -> DeadLetter:
    targets = {"warehouse": {"attempts": 5, "error": "boom"}}
    return DeadLetter(lsn, "a" * 32, f"p{lsn}", payload, targets, "exhausted", 1234.5)


def command(wal_dir: Path) -> SimpleNamespace:
    app = Celery("deadletter-commands", set_as_current=False)
    Relay(app, wal_dir=str(wal_dir))
    return SimpleNamespace(app=app)


@pytest.mark.parametrize("action", ["replay", "purge"])
@pytest.mark.parametrize(
    "letter_id", ["\u00b2", "\u0667\u0660", "7\u00b2", "", "abc", " 70", "7" * 21]
)
def test_an_id_that_is_not_an_lsn_is_refused_in_one_line(
    tmp_path: Path, action: str, letter_id: str
) -> None:
    store = DeadLetterStore(str(tmp_path))
    store.add(letter(70))
    result = CliRunner().invoke(deadletters, [action, letter_id], obj=command(tmp_path))
    assert not isinstance(result.exception, Exception) or isinstance(
        result.exception, SystemExit
    ), repr(result.exception)  # a traceback otherwise
    assert result.exit_code == 1, result.output
    assert "is not a dead-letter id" in result.output
    assert [d.id for d in store.list()] == ["70"]  # Arabic-Indic "70" is not 70


def test_a_replay_into_a_full_log_says_so_and_keeps_the_letter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WAL_SEGMENT_BYTES", "8192")
    monkeypatch.setenv("WAL_MAX_BYTES", "16384")
    monkeypatch.setenv("WAL_MIN_FREE_BYTES", "0")
    with Wal.open(tmp_path, Options.from_env()) as wal, pytest.raises(LogFullError):
        for _ in range(1000):
            wal.append(b"x" * 500)
    entry = Entry("p1", (TaskSpec("warehouse", "tasks.reserve", "warehouse", ["y" * 900]),))
    store = DeadLetterStore(str(tmp_path))
    store.add(letter(3, entry.encode()))
    result = CliRunner().invoke(deadletters, ["replay", "3"], obj=command(tmp_path))
    assert not isinstance(result.exception, Exception) or isinstance(
        result.exception, SystemExit
    ), repr(result.exception)
    assert result.exit_code == 1, result.output
    assert "full" in result.output and len(result.output.strip().splitlines()) == 1
    assert [d.id for d in store.list()] == ["3"]


def test_only_ascii_digits_make_an_lsn() -> None:
    from walrelay.record import parse_task_id
    from walstore.format import parse_segment_name

    wal_id = "a" * 32
    assert parse_task_id(f"{wal_id}-70-warehouse") == (wal_id, 70, "warehouse")
    for odd in ("\u00b2", "\u0667\u0660", "7\u00b2", "", "1" * 21):
        assert parse_task_id(f"{wal_id}-{odd}-warehouse") is None
    assert parse_segment_name("0" * 20 + ".seg") == 0
    for odd in ("0" * 19 + "\u00b2", "0" * 19 + "\u0667"):
        assert parse_segment_name(odd + ".seg") is None
