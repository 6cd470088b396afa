"""HEAD: the log remembers the newest segment it ever started, so that losing segments
at its end (deleted, or left out of a restore) is refused by open,
status and verify instead of passing for a shorter, healthy log; ``walstore repair``
accepts the loss, says so, and the log opens again."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from walstore import CorruptLogError, Options, Wal
from walstore.format import SEGMENT_HEADER_SIZE
from walstore.recovery import HEAD, read_head

pytestmark = pytest.mark.timeout(60)

OPTS = Options(segment_bytes=4096 + SEGMENT_HEADER_SIZE, preallocate=False)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "walstore.cli", *args], capture_output=True, text=True, timeout=30
    )


def make_log(path: Path, n: int) -> None:
    with Wal.open(path, OPTS) as wal:
        for i in range(n):
            wal.append(json.dumps({"n": i, "pad": "x" * 100}).encode())


def segments(path: Path) -> list[Path]:
    return sorted(path.glob("*.seg"))


def test_head_follows_every_roll_over(tmp_path: Path) -> None:
    make_log(tmp_path, 1)
    assert read_head_of(tmp_path) == 0  # written when the log is created
    make_log(tmp_path, 200)
    assert len(segments(tmp_path)) > 3
    assert read_head_of(tmp_path) == int(segments(tmp_path)[-1].stem)


def read_head_of(path: Path) -> int | None:
    from walstore.fs import OsFs

    return read_head(OsFs(), str(path))


@pytest.mark.parametrize("lost", [1, 2])
def test_lost_newest_segments_are_refused_everywhere(tmp_path: Path, lost: int) -> None:
    make_log(tmp_path, 200)
    newest = segments(tmp_path)[-1].name
    for seg in segments(tmp_path)[-lost:]:
        seg.unlink()
    with pytest.raises(CorruptLogError) as info:
        Wal.open(tmp_path, OPTS)
    assert info.value.segment == newest and "missing" in info.value.reason
    for command in ("verify", "status", "dump"):
        result = cli(command, str(tmp_path))
        assert result.returncode != 0, (command, result.stdout)
        assert newest in result.stderr + result.stdout, (command, result.stderr)


def test_every_segment_lost_is_not_a_new_log(tmp_path: Path) -> None:
    make_log(tmp_path, 200)
    for seg in segments(tmp_path):
        seg.unlink()
    with pytest.raises(CorruptLogError, match="no segment is left"):
        Wal.open(tmp_path, OPTS)
    assert not segments(tmp_path)  # nothing was created in its place


def test_repair_accepts_a_lost_tail_and_says_so(tmp_path: Path) -> None:
    make_log(tmp_path, 200)
    kept = segments(tmp_path)[-2]
    segments(tmp_path)[-1].unlink()
    result = cli("repair", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "LOST" in result.stdout and "newest segment(s) are missing" in result.stdout
    assert cli("verify", str(tmp_path)).returncode == 0
    with Wal.open(tmp_path, OPTS) as wal:
        end = wal.next_lsn()
        assert wal.append(b"after the repair") == end
    head = read_head_of(tmp_path)
    assert head is not None and head >= int(kept.stem)
    assert cli("repair", str(tmp_path)).stdout.strip() == "nothing to repair"


def test_a_head_left_behind_is_brought_forward_by_recovery(tmp_path: Path) -> None:
    """A crash between a new segment and HEAD (or a log of an older release, without
    HEAD) opens as before; recovery then records the newest segment."""
    make_log(tmp_path, 200)
    (tmp_path / HEAD).unlink()
    with Wal.open(tmp_path, OPTS) as wal:
        wal.append(b"one more")
    assert read_head_of(tmp_path) == int(segments(tmp_path)[-1].stem)
    segments(tmp_path)[-1].unlink()  # from now on its loss is seen
    with pytest.raises(CorruptLogError, match="missing"):
        Wal.open(tmp_path, OPTS)


def test_a_damaged_head_is_refused_and_repaired(tmp_path: Path) -> None:
    make_log(tmp_path, 50)
    (tmp_path / HEAD).write_bytes(b"\x01" * 16)
    with pytest.raises(CorruptLogError) as info:
        Wal.open(tmp_path, OPTS)
    assert info.value.segment == HEAD
    result = cli("repair", str(tmp_path))
    assert result.returncode == 0 and "HEAD" in result.stdout, result.stdout
    with Wal.open(tmp_path, OPTS) as wal:
        assert wal.next_lsn() == 50


@pytest.mark.parametrize("name", ["META", "CHECKPOINT", HEAD])
def test_a_small_file_replaced_by_a_directory_is_named_and_repaired(
    tmp_path: Path, name: str
) -> None:
    make_log(tmp_path, 50)
    (tmp_path / name).unlink(missing_ok=True)
    (tmp_path / name).mkdir(mode=0o700)
    with pytest.raises(CorruptLogError) as info:
        Wal.open(tmp_path, OPTS)
    assert info.value.segment == name
    assert cli("verify", str(tmp_path)).returncode == 1
    result = cli("repair", str(tmp_path))
    assert result.returncode == 0 and name in result.stdout, result.stdout + result.stderr
    with Wal.open(tmp_path, OPTS) as wal:
        assert wal.next_lsn() == 50
    assert (tmp_path / name).is_file()


def test_repair_of_a_log_without_head_finds_nothing_to_repair(tmp_path: Path) -> None:
    """A log of an older release (no HEAD) is not damaged: repair says so, and leaves
    HEAD written, as the next open would."""
    make_log(tmp_path, 200)
    (tmp_path / HEAD).unlink()
    assert cli("repair", str(tmp_path)).stdout.strip() == "nothing to repair"
    assert read_head_of(tmp_path) == int(segments(tmp_path)[-1].stem)


def test_a_head_far_ahead_is_not_filled_with_placeholders(tmp_path: Path) -> None:
    """A HEAD (valid checksum) a billion LSNs past the end: repair refuses to write that
    many placeholders and says which file to doubt, instead of running out of memory."""
    from walstore.fs import OsFs
    from walstore.recovery import write_head

    make_log(tmp_path, 200)
    write_head(OsFs(), str(tmp_path), 10**9)
    result = cli("repair", str(tmp_path))
    assert result.returncode == 2 and "HEAD" in result.stderr, result.stdout + result.stderr
    (tmp_path / HEAD).unlink()
    assert cli("repair", str(tmp_path)).returncode == 0
    with Wal.open(tmp_path, OPTS) as wal:
        assert wal.next_lsn() == 200


def test_a_damaged_losses_is_refused_naming_it(tmp_path: Path) -> None:
    make_log(tmp_path, 50)
    (tmp_path / "LOSSES").write_bytes(b"[1, 2")
    with pytest.raises(CorruptLogError) as info:
        Wal.open(tmp_path, OPTS)
    assert info.value.segment == "LOSSES"
    result = cli("status", str(tmp_path))
    assert result.returncode == 2 and "LOSSES" in result.stderr
    assert cli("repair", str(tmp_path)).returncode == 0
    with Wal.open(tmp_path, OPTS) as wal:
        assert wal.lost_tails() == [0] and wal.next_lsn() == 50


@pytest.mark.parametrize(
    "content",
    [b"[]", b'"x"', b'{"lost_tails": 5}', b'{"lost_tails": [true]}', b'{"lost_tails": [-5]}',
     b'{"lost_tails": [100000000000000000000000000000]}', b'{"lost_tails": [1.5]}',
     b"[" * 100_000],
    ids=["list", "string", "not-a-list", "bool", "negative", "huge", "float", "deep"],
)  # fmt: skip
def test_losses_that_names_no_lsns_is_refused_naming_it_and_repaired(
    tmp_path: Path, content: bytes
) -> None:
    """LOSSES must be a list of LSNs: true read as LSN 1, a number past 2**63 broke every
    keyed send (SQLite), and deep nesting was a RecursionError traceback."""
    make_log(tmp_path, 50)
    (tmp_path / "LOSSES").write_bytes(content)
    with pytest.raises(CorruptLogError) as info:
        Wal.open(tmp_path, OPTS)
    assert info.value.segment == "LOSSES"
    for command, code in (("status", 2), ("verify", 1)):
        result = cli(command, str(tmp_path))
        assert result.returncode == code and "LOSSES" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert cli("repair", str(tmp_path)).returncode == 0
    with Wal.open(tmp_path, OPTS) as wal:
        assert wal.lost_tails() == [0] and wal.next_lsn() == 50
