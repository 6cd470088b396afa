"""Attack: ``HEAD`` present but unreadable (here: a directory where the file should be).

README / docs/walstore-damage.md, row "`HEAD` unreadable": `Wal.open` "refuses naming
`HEAD`"; `status` and `dump` "exit 2 naming it"; `verify` "exit 1 naming it"; `repair`
"rewrites it from the newest segment on disk". Observed: `Wal.open` raises a bare
`IsADirectoryError` (not a `WalError`/`CorruptLogError`), every command prints
"[Errno 21] Is a directory" without naming HEAD, `verify` exits 2, and `repair` fails
(exit 2) so the log can never be opened again without a hand edit.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from walstore import CorruptLogError, Options, SyncPolicy, Wal
from walstore.format import SEGMENT_HEADER_SIZE

pytestmark = pytest.mark.timeout(60)
OPTS = Options(segment_bytes=4096 + SEGMENT_HEADER_SIZE, preallocate=False, sync=SyncPolicy.NONE)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "walstore.cli", *args], capture_output=True,
                          text=True, timeout=30)  # fmt: skip


@pytest.fixture
def log(tmp_path: Path) -> Path:
    with Wal.open(tmp_path, OPTS) as wal:
        for i in range(100):
            wal.append(json.dumps({"n": i, "pad": "x" * 100}).encode())
    (tmp_path / "HEAD").unlink()
    (tmp_path / "HEAD").mkdir(mode=0o700)
    return tmp_path


def test_open_refuses_naming_head(log: Path) -> None:
    with pytest.raises(CorruptLogError) as info:
        Wal.open(log, OPTS)
    assert info.value.segment == "HEAD"


@pytest.mark.parametrize(("command", "code"), [("status", 2), ("dump", 2), ("verify", 1)])
def test_readers_name_head(log: Path, command: str, code: int) -> None:
    result = cli(command, str(log))
    assert (result.returncode, "HEAD" in result.stdout + result.stderr) == (code, True), (
        result.returncode,
        result.stdout[-300:] + result.stderr[-300:],
    )


def test_repair_rewrites_head(log: Path) -> None:
    result = cli("repair", str(log))
    assert result.returncode == 0, result.stdout + result.stderr
    with Wal.open(log, OPTS) as wal:
        assert wal.next_lsn() == 100
