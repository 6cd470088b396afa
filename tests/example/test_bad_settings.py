"""A bad setting stops ``celery -A worker pump`` (and the other commands of the example
app) with one line naming it, not a Python traceback; nothing is created or lost."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tools.localstack import ROOT
from tools.processes import celery_bin

pytestmark = pytest.mark.timeout(120)

BAD = [
    ("PUMP_WINDOW", "abc"),
    ("PUMP_ACK_TIMEOUT", "nan"),
    ("PUMP_MAX_ATTEMPTS", "1.5"),
    ("RELAY_IDEMPOTENCY_WINDOW", "-1"),
    ("WAL_SYNC", "sometimes"),
    ("WAL_SEGMENT_BYTES", "12XB"),
    ("WAL_MAX_BYTES", "-5"),
    ("BROKER_TRANSPORT_OPTIONS", "[1]"),
    ("WAL_SEGMENT_BYTES", "1KiB"),  # a size, but too small
    ("PUMP_METRICS_PORT", "70000"),
]


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([celery_bin(), "-A", "worker", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def base_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PUMP_", "WAL_", "RELAY_", "BROKER_", "CELERY_"))}  # fmt: skip
    env.update(WAL_DIR=str(tmp_path / "wal"), CELERY_BROKER_URL="redis://127.0.0.1:1/0",
               LEDGER_URL=f"sqlite:///{tmp_path / 'ledger.sqlite3'}")  # fmt: skip
    return env


@pytest.mark.parametrize(("name", "value"), BAD, ids=[f"{n}={v}" for n, v in BAD])
def test_a_bad_setting_stops_the_pump_in_one_line_naming_it(
    tmp_path: Path, name: str, value: str
) -> None:
    done = run(["pump"], {**base_env(tmp_path), name: value})
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert "Traceback" not in out, out
    assert name in out, out
    assert len(out.strip().splitlines()) <= 2, out
    assert not (tmp_path / "wal").exists()  # nothing was opened or created


def test_a_file_where_the_log_should_be_stops_the_pump_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "wal").write_text("not a directory")
    done = run(["pump"], base_env(tmp_path))
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "Traceback" not in out, out
    assert str(tmp_path / "wal") in out and len(out.strip().splitlines()) <= 2, out
    assert "not a directory" in out, out  # it said "[Errno 17] File exists"


@pytest.mark.parametrize(
    "url",
    ["postgresql+psycopg://ann:s3cret@127.0.0.1:1/ledger", "nosuchdb://ann:s3cret@x/y", "::"],
    ids=["unreachable", "unknown-dialect", "not-a-url"],
)
def test_a_ledger_it_cannot_reach_is_one_line_without_the_password(
    tmp_path: Path, url: str
) -> None:
    done = run(["ledger", "--json"], {**base_env(tmp_path), "LEDGER_URL": url})
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "Traceback" not in out, out
    assert "s3cret" not in out and len(out.strip().splitlines()) <= 2, out
    assert out.startswith("Error: cannot read the ledger"), out


def test_the_ledger_command_creates_no_database_where_there_is_none(tmp_path: Path) -> None:
    """A reading command: a mistyped LEDGER_URL made it create an empty database there
    (and its directories) and answer as if nothing was delivered (review 4). It answers
    with nothing recorded, says where it found no ledger, and creates nothing."""
    missing = tmp_path / "sub" / "dir" / "ledger.sqlite3"
    done = run(["ledger", "--json"], {**base_env(tmp_path), "LEDGER_URL": f"sqlite:///{missing}"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == '{"finance": {}, "warehouse": {}}'
    assert "no ledger" in done.stderr and str(missing) in done.stderr, done.stderr
    assert not (tmp_path / "sub").exists()
