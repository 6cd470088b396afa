"""The attach protocol under fire: processes open, append, close and are SIGKILLed, a
repair runs again and again, and LOCK, shm and append.lock are removed or replaced at
random moments, all at once, for a few seconds (bounded in count and time).

Invariants: no LSN acknowledged twice, no acknowledged record lost (each at its LSN), the
log verifies, and every refusal is one of walstore's explicit errors."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from walstore import Options, Wal
from walstore.inspect import verify

ATTACHER = Path(__file__).resolve().parents[1] / "support" / "wal_attacher.py"
SECONDS = 4.0
APPENDERS = 4


def spawn(wal_dir: Path, log: Path, ident: str, *extra: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    cmd = [sys.executable, str(ATTACHER), str(wal_dir), str(log), ident, str(SECONDS), *extra]
    return subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)


def vandalise(wal_dir: Path, rng: random.Random) -> str:
    """Remove or replace one shared file, as an operator's rm or a cleanup cron would."""
    name = rng.choice(["LOCK", "shm", "append.lock"])
    path = wal_dir / name
    if not path.exists():
        return f"{name} absent"
    if name == "shm" and rng.random() < 0.5:
        shutil.copy(path, wal_dir / "shm.copy")  # a stale but valid-looking copy
        os.replace(wal_dir / "shm.copy", path)
        return "shm replaced"
    path.unlink()
    return f"{name} removed"


def events(log_dir: Path) -> list[list[str]]:
    out = []
    for path in sorted(log_dir.glob("*.log")):
        for line in path.read_text().splitlines():
            parts = line.split(" ", 2)
            if parts[0] in ("ack", "refused", "repaired", "error") and len(parts) >= 2:
                out.append(parts)
    return out


@pytest.mark.timeout(120)
def test_open_append_close_repair_and_vandals_at_once(tmp_path: Path) -> None:
    wal_dir, log_dir = tmp_path / "wal", tmp_path / "logs"
    log_dir.mkdir()
    Wal.open(wal_dir, Options(segment_bytes=16384)).close()
    rng = random.Random(20240611)
    procs = {f"a{i}": spawn(wal_dir, log_dir / f"a{i}.log", f"a{i}") for i in range(APPENDERS)}
    repairer = spawn(wal_dir, log_dir / "repair.log", "r", "repair")
    deadline = time.monotonic() + SECONDS
    vandalism: Counter[str] = Counter()
    kills, spawned = 0, APPENDERS
    while time.monotonic() < deadline and kills + sum(vandalism.values()) < 60:
        time.sleep(rng.uniform(0.05, 0.2))
        if rng.random() < 0.5:
            vandalism[vandalise(wal_dir, rng)] += 1
        else:  # kill -9 an appender (whatever it is doing) and start another
            victim = rng.choice(sorted(procs))
            dead = procs.pop(victim)
            dead.send_signal(signal.SIGKILL)
            dead.wait(10)
            kills += 1
            ident = f"a{spawned}"
            spawned += 1
            procs[ident] = spawn(wal_dir, log_dir / f"{ident}.log", ident)
    for proc in [*procs.values(), repairer]:
        proc.wait(30)

    seen = events(log_dir)
    errors = [e for e in seen if e[0] == "error"]
    assert not errors, errors[:5]
    refusals = Counter(e[1] for e in seen if e[0] == "refused")
    assert set(refusals) <= {"LogBusyError", "LogAttachError"}, refusals
    repairs = [e for e in seen if e[0] == "repaired"]
    assert all(e[2].endswith("lost=[]") for e in repairs), repairs  # nothing acked lost
    acks = [(int(e[1]), e[2]) for e in seen if e[0] == "ack"]
    lsns = Counter(lsn for lsn, _ in acks)
    twice = {lsn: n for lsn, n in lsns.items() if n > 1}
    assert not twice, f"LSNs acknowledged more than once: {sorted(twice)[:10]}"

    report = verify(str(wal_dir))
    assert report.ok, report.problems
    with Wal.open(wal_dir, Options(segment_bytes=16384)) as wal:
        got = {lsn: payload.split(b"|", 1)[0].decode() for lsn, payload in wal.iter_from(0)}
    missing = [(lsn, tag) for lsn, tag in acks if got.get(lsn) != tag]
    assert not missing, f"acknowledged records lost or moved: {missing[:10]}"
    # The run exercised what it claims to (else it proves nothing).
    assert len(acks) > 200 and kills >= 3 and sum(vandalism.values()) >= 3, (
        len(acks), kills, vandalism)  # fmt: skip
    assert repairs and refusals["LogBusyError"], (len(repairs), refusals)
    print(f"acks={len(acks)} kills={kills} vandalism={dict(vandalism)} "
          f"repairs={len(repairs)} refusals={dict(refusals)}")  # fmt: skip
