"""A leader killed between writing a copy of the shared write region and selecting it
(shm undamaged): the producers waiting in slots are written, or written again, and
none is told the outcome is unknown; nothing acknowledged is lost."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from walstore import Options, Wal
from walstore.inspect import verify

ROOT = Path(__file__).resolve().parents[2]


def _acks(ack_dir: Path) -> dict[int, str]:
    out: dict[int, str] = {}
    for path in ack_dir.glob("*.acks"):
        for line in path.read_text().splitlines():
            lsn, tag = line.split(" ", 1)
            assert int(lsn) not in out, f"LSN {lsn} acknowledged twice"
            out[int(lsn)] = tag
    return out


@pytest.mark.parametrize("mode", ["batch", "append"])
def test_followers_of_a_leader_killed_before_its_switch_are_not_failed(
    tmp_path: Path, mode: str
) -> None:
    directory, acks = tmp_path / "wal", tmp_path / "acks"
    acks.mkdir()
    Wal.open(directory, Options(min_free_bytes=0)).close()
    holder = Wal.open(directory)  # keeps the shared state across the deaths
    try:
        followers = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.support.wal_appender",
                    str(directory),
                    str(acks / f"f{i}.acks"),
                    f"f{i}",
                    str(64 << 20),
                ],
                cwd=ROOT,
                stderr=subprocess.PIPE,
            )
            for i in range(4)
        ]
        time.sleep(0.5)
        leader = subprocess.run(
            [sys.executable, "-m", "tests.support.dying_leader", str(directory), mode],
            cwd=ROOT, timeout=60, check=False,
        )  # fmt: skip
        assert leader.returncode == -signal.SIGKILL, "the leader never reached its death"
        time.sleep(0.5)  # the followers go on after it
        errors = []
        for proc in followers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            _, err = proc.communicate(timeout=30)
            if proc.returncode != -signal.SIGKILL:
                errors.append(err.decode()[-400:])
        assert errors == [], f"followers failed: {errors}"
    finally:
        holder.close()
    acked = _acks(acks)
    with Wal.open(directory) as wal:
        found = {lsn: bytes(p) for lsn, p in wal.iter_from(wal.first_lsn())}
    for lsn, tag in acked.items():
        assert found[lsn].startswith((tag + "|").encode()), f"LSN {lsn} lost or replaced"
    assert verify(str(directory)).ok
