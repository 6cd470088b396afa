"""Permissions: every directory the log creates is 0700 and every file 0600, whatever
the umask; an existing WAL_DIR that others could write to (or that belongs to someone
else) is refused with a message saying what to do, as PostgreSQL and ssh refuse."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from walstore import Options, Wal, WalError
from walstore.repair import repair

pytestmark = pytest.mark.timeout(30)

OPTS = Options(segment_bytes=4160, min_free_bytes=0)


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def everything_under(root: Path) -> list[Path]:
    return [root, *sorted(root.rglob("*"))]


@pytest.mark.parametrize("mask", [0o000, 0o002, 0o277], ids=["umask-000", "umask-002", "umask-277"])
def test_everything_the_log_creates_is_private_whatever_the_umask(
    tmp_path: Path, mask: int
) -> None:
    top = tmp_path / "srv"  # every component from here on is created by the log
    wal_dir = top / "app" / "wal"
    with umask(mask):
        with Wal.open(wal_dir, OPTS) as wal:
            for i in range(80):  # a few segments
                wal.append(f"{i}".encode().ljust(100, b"."))
            wal.set_low_water_mark(40)
        seg = sorted(wal_dir.glob("*.seg"))[-1]
        with open(seg, "r+b") as f:  # a torn tail: open cuts it into torn/
            f.seek(64 + (80 - int(seg.stem)) * 120)
            f.write(b"\x55" * 50)
        Wal.open(wal_dir, OPTS).close()
        raw = bytearray(seg.read_bytes())
        raw[64 + 40] ^= 1  # a bit flip repair rewrites (original kept in repair-*/)
        seg.write_bytes(bytes(raw))
        assert repair(str(wal_dir)).changed
    made = everything_under(top)
    assert any(p.name == "torn" for p in made) and any(p.name.startswith("repair-") for p in made)
    wrong = {
        str(p.relative_to(tmp_path)): oct(mode(p))
        for p in made
        if mode(p) != (0o700 if p.is_dir() else 0o600)
    }
    assert not wrong, wrong


@pytest.mark.parametrize("bits", [0o770, 0o707, 0o777, 0o720])
def test_a_wal_dir_others_can_write_to_is_refused(tmp_path: Path, bits: int) -> None:
    wal_dir = tmp_path / "wal"
    wal_dir.mkdir()
    wal_dir.chmod(bits)
    with pytest.raises(WalError, match=rf"writable by (group|others).*chmod 700 {wal_dir}"):
        Wal.open(wal_dir, OPTS)
    with pytest.raises(WalError, match="writable by"):
        repair(str(wal_dir))
    assert os.listdir(wal_dir) == []  # refused before creating anything
    wal_dir.chmod(0o750)  # readable by the group is fine (PostgreSQL allows it too)
    Wal.open(wal_dir, OPTS).close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory away")
def test_a_wal_dir_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    wal_dir = tmp_path / "wal"
    wal_dir.mkdir(mode=0o700)
    os.chown(wal_dir, 4242, 4242)
    with pytest.raises(WalError, match=rf"owned by uid 4242.*uid {os.geteuid()}"):
        Wal.open(wal_dir, OPTS)
    assert os.listdir(wal_dir) == []


def test_a_file_where_the_log_directory_should_be_is_named_not_a_directory(
    tmp_path: Path,
) -> None:
    (tmp_path / "wal").write_text("a file")
    with pytest.raises(NotADirectoryError) as info:
        Wal.open(tmp_path / "wal" / "inner")
    assert "not a directory" in str(info.value) and str(tmp_path / "wal") in str(info.value)
    with pytest.raises(NotADirectoryError) as info:
        Wal.open(tmp_path / "wal")
    assert "not a directory" in str(info.value)
