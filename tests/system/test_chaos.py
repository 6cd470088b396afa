"""The chaos command (tools.chaos): a seeded schedule, a short real run against a local
stack (a private broker of each kind, workers, pump, producers), and that it stops what it
started when it is told to stop."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tools.brokers import KINDS as BROKERS
from tools.faults import BROKER_KINDS, KINDS, plan
from tools.loadgen import ProducerPool
from tools.localstack import LocalStack
from tools.processes import processes_mentioning

ROOT = Path(__file__).resolve().parents[2]
SEED = 10  # 20 s with --mean-gap 3: broker-restart, acks-lost, worker-kill, pump-kill


def chaos(*args: str) -> list[str]:
    return [sys.executable, "-m", "tools.chaos", *args]


def test_the_schedule_is_a_function_of_the_seed() -> None:
    first = plan(42, 300, workers=2, producers=2)
    assert first == plan(42, 300, workers=2, producers=2)
    assert first != plan(43, 300, workers=2, producers=2)
    assert {f.kind for f in first} == set(KINDS)  # 5 minutes: every kind, from the bag
    ends = [(f.at, f.at + f.hold) for f in first]
    assert all(start >= 5 and end <= 295 for start, end in ends)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(ends))
    assert plan(42, 20, workers=2, producers=2) == plan(42, 20, workers=2, producers=2)


@pytest.mark.timeout(60)
def test_plan_prints_the_schedule_without_running_anything() -> None:
    argv = chaos("--plan", "--json", "--seed", "7", "--duration", "60")
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=50, check=True)
    expected = plan(7, 60, workers=2, producers=2)
    assert [(f["at"], f["kind"]) for f in json.loads(out.stdout)] == [
        (f.at, f.kind) for f in expected
    ]
    # Tooling, not product: no `celery chaos` in a production install.
    celery = str(Path(sys.executable).with_name("celery"))
    argv = [celery, "-A", "worker", "chaos", "--plan"]
    again = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=50)
    assert again.returncode != 0 and "No such command" in again.stderr


def test_the_journal_counts_only_whole_lines(tmp_path: Path) -> None:
    pool = ProducerPool(LocalStack(tmp_path), count=1, rate=1.0, until=0.0)
    pool.journals.mkdir(parents=True)
    (pool.journals / "producer-1.log").write_text(
        "try p1x0-0\nok p1x0-0 0\ntry p1x0-1\nerr p1x0-1 LogFullError\ntry p1x0-2\nok p1x0-2 2\n"
        "try p1x0-3\nok p1x0"  # killed mid-write: the torn line does not count
    )
    attempted, acked = pool.journal()
    assert attempted == {"p1x0-0", "p1x0-1", "p1x0-2", "p1x0-3"}
    assert acked == {"p1x0-0", "p1x0-2"}


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("broker", BROKERS)
def test_a_short_chaos_run_loses_nothing_and_stops_everything(tmp_path: Path, broker: str) -> None:
    workdir = tmp_path / "chaos"
    env = dict(os.environ, PUMP_ACK_TIMEOUT="5")  # a task held by a killed worker: 5 s
    args = ("--duration", "20", "--seed", str(SEED), "--mean-gap", "3", "--rate", "30",
            "--broker", broker)  # fmt: skip
    out = subprocess.run(chaos(*args, "--json", "--workdir", str(workdir)), cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=200, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    report = json.loads(out.stdout)
    assert report["ok"] and report["drained"]
    assert report["lost"] == 0 and report["double_effects"] == 0 and report["phantoms"] == 0
    assert report["dead_letters"] == 0
    assert report["acknowledged"] > 300  # 30/s for 20 s, less what the kills cost
    delivered = report["acknowledged"] + report["unacknowledged_delivered"]
    for target in ("warehouse", "finance"):
        assert report["effects"][target] == delivered, target
        dup = report["deliveries"][target] - report["effects"][target]
        assert dup == report["duplicates"][target] >= 0, target
    assert report["duplicates_absorbed"] == sum(report["duplicates"].values())
    # It followed the schedule of its seed, and recovered from every broker fault.
    expected = plan(SEED, 20, workers=2, producers=2, mean_gap=3)
    done = report["faults"] + report["skipped_faults"]  # skipped: earlier ones overran
    assert [(f["kind"], f["at"]) for f in done] == [(f.kind, f.at) for f in expected]
    # A RabbitMQ node takes ~10 s to restart: two of its faults fill the 20 s.
    assert len(report["faults"]) >= (2 if broker == "rabbitmq" else 3)
    assert not [f for f in report["faults"] if f["error"]]
    faults = [f for f in report["faults"] if f["kind"] in BROKER_KINDS]
    assert faults and all(f["recovery"] is not None for f in faults)
    assert report["longest_broker_recovery"] == max(f["recovery"] for f in faults)
    acks_lost = [f for f in report["faults"] if f["kind"] == "acks-lost"]
    assert acks_lost
    if broker != "rabbitmq":  # RabbitMQ pushes them on to the paused pump's socket
        assert int(acks_lost[0]["note"].split()[0]) > 0  # done, unacked, then lost
    assert f"--seed {SEED} --broker {broker}" in report["replay"]
    assert report["broker"] == broker
    assert report["wal"]["pending"] == 0
    assert report["left_running"] == [] and processes_mentioning(str(workdir)) == []


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_signal_stops_everything_it_started(tmp_path: Path, sig: signal.Signals) -> None:
    workdir, log = tmp_path / "chaos", tmp_path / "chaos.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            chaos("--duration", "120", "--seed", "1", "--workdir", str(workdir)),
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not list((workdir / "journals").glob("producer-*.log")):  # running: load on
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert processes_mentioning(str(workdir))  # the stack is up
        proc.send_signal(sig)
        assert proc.wait(60) == 130, log.read_text()
        assert "interrupted; stopping everything it started" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert processes_mentioning(str(workdir)) == []
