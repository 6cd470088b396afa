"""``walstore status|dump|verify|repair`` as an operator runs them (real subprocesses)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from walstore import CorruptLogError, Options, Wal
from walstore.format import SEGMENT_HEADER_SIZE

pytestmark = pytest.mark.timeout(60)

SEG = 4096 + SEGMENT_HEADER_SIZE
OPTS = Options(segment_bytes=SEG, preallocate=False)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "walstore.cli", *args], capture_output=True, text=True, timeout=30
    )


def make_log(path: Path, n: int, lwm: int = 0) -> list[bytes]:
    payloads = [json.dumps({"n": i, "pad": "x" * 100}).encode() for i in range(n)]
    with Wal.open(path, OPTS) as wal:
        for p in payloads:  # one by one: a batch never splits across segments
            wal.append(p)
        if lwm:
            wal.set_low_water_mark(lwm)
    return payloads


def segments(path: Path) -> list[Path]:
    return sorted(path.glob("*.seg"))


def test_console_script_is_installed() -> None:
    exe = shutil.which("walstore") or str(Path(sys.executable).with_name("walstore"))
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert "status" in result.stdout and "repair" in result.stdout


def test_status_json_has_the_contract_keys(tmp_path: Path) -> None:
    make_log(tmp_path, 100, lwm=60)
    result = cli("status", str(tmp_path), "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert {"segments", "bytes", "next_lsn", "low_water_mark", "high_water_mark", "pending"} <= (
        set(doc)
    )
    assert doc["next_lsn"] == doc["high_water_mark"] == 100
    assert doc["low_water_mark"] == 60 and doc["pending"] == 40
    assert doc["segments"] == len(segments(tmp_path))
    assert doc["bytes"] == sum(p.stat().st_size for p in segments(tmp_path))
    assert "pending" in cli("status", str(tmp_path)).stdout


def test_status_of_a_live_log_reads_the_shared_state(tmp_path: Path) -> None:
    with Wal.open(tmp_path, OPTS) as wal:
        wal.append_batch([b"a", b"b", b"c"])
        doc = json.loads(cli("status", str(tmp_path), "--json").stdout)
        assert doc["live"] is True and doc["next_lsn"] == 3
    assert json.loads(cli("status", str(tmp_path), "--json").stdout)["live"] is False


def test_dump_json_one_object_a_line_from_an_lsn(tmp_path: Path) -> None:
    payloads = make_log(tmp_path, 50)
    with Wal.open(tmp_path, OPTS) as wal:
        binary = wal.append(b"\xff\xfe not utf-8")
    result = cli("dump", str(tmp_path), "--from", "45", "--json")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [d["lsn"] for d in lines] == [*range(45, 50), binary]
    assert [d["payload"] for d in lines[:-1]] == [p.decode() for p in payloads[45:]]
    assert lines[-1]["payload"] is None
    assert bytes.fromhex(lines[-1]["payload_hex"]) == b"\xff\xfe not utf-8"


def test_verify_names_segment_and_offset_then_repair_salvages(tmp_path: Path) -> None:
    payloads = make_log(tmp_path, 120)
    assert cli("verify", str(tmp_path)).returncode == 0
    sealed = segments(tmp_path)[1]
    first = int(sealed.name.split(".")[0])
    fourth = SEGMENT_HEADER_SIZE + sum(20 + len(p) for p in payloads[first : first + 3])
    raw = bytearray(sealed.read_bytes())
    raw[fourth + 40] ^= 0x01  # inside the 4th record's payload
    sealed.write_bytes(bytes(raw))

    result = cli("verify", str(tmp_path))
    assert result.returncode == 1
    assert f"segment {sealed.name} offset {fourth}: record checksum mismatch" in result.stderr
    with Wal.open(tmp_path, OPTS) as wal, pytest.raises(CorruptLogError) as info:
        list(wal.iter_from(0))  # a reader never delivers the damaged record
    assert info.value.segment == sealed.name

    result = cli("repair", str(tmp_path))
    assert result.returncode == 0, result.stderr
    bad = first + 3
    assert f"LOST: LSN {bad}..{bad}" in result.stdout
    assert len(list(tmp_path.glob("repair-*/*.seg"))) == 1  # the original is kept
    assert cli("verify", str(tmp_path)).returncode == 0
    with Wal.open(tmp_path, OPTS) as wal:
        got = list(wal.iter_from(0))
        assert got == [(i, p) for i, p in enumerate(payloads) if i != bad]
        assert wal.append(b"more") == 120


def test_repair_clears_zeros_after_the_last_record_of_a_sealed_segment(tmp_path: Path) -> None:
    """A sealed segment is cut to its last record when sealed: zeros found after it are
    damage verify reports; repair cuts them (no record lost), after which verify passes
    (review 4: repair said "nothing to repair" and verify failed for good)."""
    payloads = make_log(tmp_path, 120)
    sealed = segments(tmp_path)[1]
    end = sealed.stat().st_size
    with sealed.open("ab") as f:
        f.write(bytes(100))
    result = cli("verify", str(tmp_path))
    assert result.returncode == 1
    assert f"segment {sealed.name} offset {end}:" in result.stderr

    result = cli("repair", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "nothing to repair" not in result.stdout
    assert "LOST" not in result.stdout
    assert len(list(tmp_path.glob("repair-*/*.seg"))) == 1  # the original is kept
    assert sealed.stat().st_size == end
    assert cli("verify", str(tmp_path)).returncode == 0, cli("verify", str(tmp_path)).stderr
    with Wal.open(tmp_path, OPTS) as wal:
        assert list(wal.iter_from(0)) == list(enumerate(payloads))


def test_repair_refuses_a_segment_name_far_past_the_log(tmp_path: Path) -> None:
    """A stray file named like a segment millions of LSNs past the end: repair would fill
    the gap with a lost placeholder per LSN (review 4: 200 MB for 10M, out of memory for
    100M). It refuses past MAX_PLACEHOLDERS, naming the file, as it does for HEAD."""
    from walstore.repair import MAX_PLACEHOLDERS

    payloads = make_log(tmp_path, 60)
    stray = tmp_path / f"{MAX_PLACEHOLDERS + 1000:020d}.seg"
    stray.write_bytes(b"")
    result = cli("repair", str(tmp_path))
    assert result.returncode == 2, result.stdout
    assert stray.name in result.stderr and "move it out" in result.stderr
    assert not list(tmp_path.glob("repair-*/*.seg"))  # nothing was rewritten
    stray.unlink()
    assert cli("verify", str(tmp_path)).returncode == 0
    with Wal.open(tmp_path, OPTS) as wal:
        assert list(wal.iter_from(0)) == list(enumerate(payloads))


def test_dump_from_past_the_high_water_mark_is_refused(tmp_path: Path) -> None:
    """As Wal.reader refuses it (review 4: dump printed nothing and exited 0, as for a
    log that ends there)."""
    make_log(tmp_path, 5)
    assert cli("dump", str(tmp_path), "--from", "5").returncode == 0  # the end: nothing yet
    result = cli("dump", str(tmp_path), "--from", "6")
    assert result.returncode == 2
    assert "past the high water mark" in result.stderr


def test_a_directory_named_like_a_segment(tmp_path: Path) -> None:
    """review 4: open, status and dump failed with a bare IsADirectoryError, verify with
    exit 2, and repair could not get past it."""
    payloads = make_log(tmp_path, 60)
    stray = tmp_path / f"{99999:020d}.seg"
    stray.mkdir()
    with pytest.raises(CorruptLogError, match="is a directory"):
        Wal.open(tmp_path, OPTS)
    result = cli("verify", str(tmp_path))
    assert result.returncode == 1
    assert f"segment {stray.name} offset 0: is a directory" in result.stderr
    result = cli("status", str(tmp_path))
    assert result.returncode == 2 and stray.name in result.stderr
    result = cli("repair", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert stray.name in result.stdout and not stray.exists()
    assert cli("verify", str(tmp_path)).returncode == 0
    with Wal.open(tmp_path, OPTS) as wal:
        assert list(wal.iter_from(0)) == list(enumerate(payloads))


def test_repair_sets_aside_a_stray_file_inside_a_segments_lsns(tmp_path: Path) -> None:
    """A garbage file named like a segment whose LSNs a sealed segment holds, records
    that verify: open and verify name it; repair moved nothing and failed with "runs past
    the next segment" for good (review 4). It is not a segment of this log: repair moves
    it to its backup directory."""
    payloads = make_log(tmp_path, 120)
    sealed = segments(tmp_path)[1]
    inside = int(sealed.name.split(".")[0]) + 2
    stray = tmp_path / f"{inside:020d}.seg"
    stray.write_bytes(b"x" * 100)
    with pytest.raises(CorruptLogError):
        Wal.open(tmp_path, OPTS)
    assert cli("verify", str(tmp_path)).returncode == 1
    result = cli("repair", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert stray.name in result.stdout and "LOST" not in result.stdout
    assert not stray.exists() and len(list(tmp_path.glob(f"repair-*/{stray.name}"))) == 1
    assert cli("verify", str(tmp_path)).returncode == 0
    with Wal.open(tmp_path, OPTS) as wal:
        assert list(wal.iter_from(0)) == list(enumerate(payloads))


def test_repair_sets_aside_a_stray_file_below_the_low_water_mark(tmp_path: Path) -> None:
    """A garbage file named below the first segment, all of its LSNs confirmed (below
    the low water mark, their segment pruned): repair reported them LOST (review 5).
    Confirmed records are not lost: the file is moved aside, nothing reported lost."""
    payloads = make_log(tmp_path, 120)
    firsts = [int(p.name.split(".")[0]) for p in segments(tmp_path)]
    with Wal.open(tmp_path, OPTS) as wal:
        assert wal.set_low_water_mark(firsts[1]) == 1  # the first segment is pruned
    stray = tmp_path / f"{firsts[1] // 2:020d}.seg"
    stray.write_bytes(os.urandom(200))
    result = cli("repair", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert stray.name in result.stdout and "LOST" not in result.stdout, result.stdout
    assert not stray.exists()
    assert cli("verify", str(tmp_path)).returncode == 0
    with Wal.open(tmp_path, OPTS) as wal:
        assert list(wal.iter_from(firsts[1])) == list(enumerate(payloads))[firsts[1] :]


def test_a_lock_file_removed_under_a_live_log(tmp_path: Path) -> None:
    """status and dump read the live figures from shm, which is intact: as usual; a new
    open refuses (the damage table, review 4)."""
    from walstore import LogAttachError

    with Wal.open(tmp_path, OPTS) as wal:
        for i in range(5):
            wal.append(b"r%d" % i)
        (tmp_path / "append.lock").unlink()
        result = cli("status", str(tmp_path), "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["high_water_mark"] == 5
        assert cli("dump", str(tmp_path)).stdout.count("\n") == 5
        with pytest.raises(LogAttachError, match=r"append\.lock"):
            Wal.open(tmp_path, OPTS)


def test_repair_fills_a_missing_middle_segment(tmp_path: Path) -> None:
    payloads = make_log(tmp_path, 120)
    victim = segments(tmp_path)[1]
    lost_first = int(victim.name.split(".")[0])
    lost_end = int(segments(tmp_path)[2].name.split(".")[0])
    victim.unlink()
    with pytest.raises(CorruptLogError, match="gap in the segment sequence"):
        Wal.open(tmp_path, OPTS)
    assert cli("verify", str(tmp_path)).returncode == 1
    result = cli("repair", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert f"LOST: LSN {lost_first}..{lost_end - 1}" in result.stdout
    with Wal.open(tmp_path, OPTS) as wal:
        got = list(wal.iter_from(0))
    assert got == [(i, p) for i, p in enumerate(payloads) if not lost_first <= i < lost_end]


def test_torn_tail_is_a_warning_and_repair_refuses_a_live_log(tmp_path: Path) -> None:
    make_log(tmp_path, 20)
    tail = segments(tmp_path)[-1]
    with open(tail, "ab") as f:
        f.write(b"\x13" * 30)  # half a record after the last whole one
    result = cli("verify", str(tmp_path))
    assert result.returncode == 0
    assert "torn tail" in result.stderr
    with Wal.open(tmp_path, OPTS):
        busy = cli("repair", str(tmp_path))
        assert busy.returncode == 2
        assert "open in another process" in busy.stderr
    assert "torn tail" not in cli("verify", str(tmp_path)).stderr  # open cut it


def test_bad_directory_is_a_clear_error(tmp_path: Path) -> None:
    result = cli("status", str(tmp_path / "nope"))
    assert result.returncode == 2
    assert "no such directory" in result.stderr
    os.mkdir(tmp_path / "empty")
    result = cli("verify", str(tmp_path / "empty"))
    assert result.returncode != 0
