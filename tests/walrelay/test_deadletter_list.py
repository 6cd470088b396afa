"""``deadletters list`` with one unreadable dead-letter file (a torn copy, a disk error,
a hand edit): the readable ones are listed, the bad one is reported by name, and the
command exits non-zero; before, one bad file made the whole listing fail."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from celery import Celery
from click.testing import CliRunner

from walrelay import Relay
from walrelay.commands.deadletters import deadletters
from walrelay.deadletters import DeadLetter, DeadLetterStore

pytestmark = pytest.mark.timeout(30)


def letter(lsn: int) -> DeadLetter:
    targets = {"warehouse": {"attempts": 5, "error": "boom"}}
    return DeadLetter(lsn, "a" * 32, f"p{lsn}", b'{"v": 1}', targets, "exhausted", 1234.5)


def test_one_unreadable_dead_letter_does_not_hide_the_others(tmp_path: Path) -> None:
    store = DeadLetterStore(str(tmp_path))
    for lsn in (3, 7, 12):
        store.add(letter(lsn))
    bad = tmp_path / "deadletters" / f"{7:020d}.json"
    bad.write_bytes(b'{"lsn": 7, "wal_id": "tr')  # torn
    app = Celery("deadletter-list", set_as_current=False)
    Relay(app, wal_dir=str(tmp_path))
    obj = SimpleNamespace(app=app)
    for args in (["list"], ["list", "--json"]):
        result = CliRunner().invoke(deadletters, args, obj=obj)
        assert not isinstance(result.exception, Exception), result.exception  # no traceback
        assert result.exit_code == 1, result.output
        assert f"unreadable dead letter {bad}" in result.stderr
        if "--json" in args:
            assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == ["3", "12"]
        else:
            assert [line.split("\t")[0] for line in result.stdout.splitlines()] == ["3", "12"]
    assert [d.id for d in store.list()] == ["3", "12"]
    letters, unreadable = store.scan()
    assert [d.id for d in letters] == ["3", "12"]
    assert [path for path, _why in unreadable] == [str(bad)]
