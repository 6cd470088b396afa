"""Several hosts for real (issue 12): three hosts, each a network namespace running the
web app, its own WAL and its pump; the broker (a private redis-server), two workers and
the ledger (a database of the test's own on the machine's PostgreSQL) here, in the root
namespace, which the hosts reach over veth pairs on a bridge. Customers (HTTP clients
inside each host's namespace) buy throughout while:

1. host 0's pump is killed (-9) and restarted;
2. host 1 is cut off from the network for 30 s, its web app taking purchases all along;
3. the broker is killed (-9) and restarted empty.

Verdict per host: every purchase its web app acknowledged (201) has exactly one effect
at both targets in the ledger, none is unknown, its log drains (pending 0), no dead
letter; and the time from each fault's end until that host's low water mark passed its
backlog. Where namespaces cannot be made, the test says so and runs the hosts as process
groups instead (the cut-off is then a pump frozen for as long).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support import netns
from tests.support.faultkit import Journal, report
from tests.support.postgres import private_database
from tools import roles
from tools.audit import audit
from tools.localstack import ROOT, pipeline_env
from tools.processes import Proc, Processes, celery_bin, free_port, http_ok, wait_until
from tools.redis_server import RedisServer
from walrelay.deadletters import DeadLetterStore
from walstore.inspect import Snapshot, snapshot

pytestmark = [pytest.mark.slow, pytest.mark.faults, pytest.mark.timeout(600)]

HOSTS = 3
RATE = 4.0  # purchases/s per host
CUT_SECONDS = 30.0
TARGETS = ("warehouse", "finance")
PRODUCER = str(Path(__file__).resolve().parents[1] / "support" / "http_producer.py")
Env = Callable[[Mapping[str, str] | None], dict[str, str]]


@pytest.fixture
def ledger_url() -> Iterator[str]:
    """A database of this test's own, dropped at the end."""
    with private_database("walrelay_hosts") as url:
        yield url


@dataclass
class Host:
    """One host: its work dir, web app, pump and customers."""

    index: int
    workdir: Path
    procs: Processes
    url: str  # where its customers reach its web app
    web: Proc | None = None
    pump: Proc | None = None
    customers: Proc | None = None
    journal_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.journal_path = self.workdir / "journal.log"

    @property
    def prefix(self) -> str:
        return f"h{self.index}"

    def snapshot(self) -> Snapshot:
        for _ in range(20):  # a prune between listing and sizing the segments: again
            with contextlib.suppress(FileNotFoundError):
                return snapshot(str(self.workdir / "wal"))
            time.sleep(0.05)
        return snapshot(str(self.workdir / "wal"))

    def journal(self) -> Journal:
        journal = Journal()
        if self.journal_path.exists():
            journal.add(self.journal_path)
        return journal


class Cluster:
    """The hosts, the broker, the workers and the ledger."""

    def __init__(self, tmp: Path, ledger_url: str) -> None:
        self.tmp = tmp
        self.ledger_url = ledger_url
        self.why_not = netns.probe()
        self.net = netns.Network(HOSTS) if self.why_not is None else None
        binds = ("127.0.0.1",) if self.net is None else ("127.0.0.1", self.net.gateway)
        self.redis = RedisServer(tmp / "redis", binds=binds)
        self.central = Processes(tmp / "logs", ROOT, self._env(tmp / "central", self.redis_url))
        self.hosts: list[Host] = []

    @property
    def redis_url(self) -> str:
        return self.redis.url

    def host_broker_url(self) -> str:
        if self.net is None:
            return self.redis.url
        return f"redis://{self.net.gateway}:{self.redis.port}/0"

    def _env(self, workdir: Path, broker_url: str) -> Env:
        settings = {"LEDGER_URL": self.ledger_url, "WAL_SYNC": "always",
                    "WAL_SEGMENT_BYTES": "65536", "PUMP_ACK_TIMEOUT": "20",
                    "PUMP_MAX_ACK_TIMEOUT": "40"}  # fmt: skip
        base = pipeline_env(broker_url, workdir, settings)

        def env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
            return {**base, **(extra or {})}

        return env

    def start(self) -> None:
        if self.net is not None:
            self.net.open()
        self.redis.start()
        for i in range(2):
            roles.start_worker(self.central, f"w{i}", 2, wait=False)
        for proc in self.central.started:
            roles.wait_worker(proc)
        for i in range(HOSTS):
            self.hosts.append(self._start_host(i))

    def _inside(self, host: int, argv: list[str]) -> list[str]:
        return argv if self.net is None else self.net.inside(host, argv)

    def _start_host(self, i: int) -> Host:
        workdir = self.tmp / f"host{i}"
        workdir.mkdir()
        port = 8000 if self.net is not None else free_port()
        procs = Processes(workdir / "logs", ROOT, self._env(workdir, self.host_broker_url()))
        if self.net is None:
            url = f"http://127.0.0.1:{port}"
        else:
            url = f"http://{self.net.address(i)}:{port}"
        host = Host(i, workdir, procs, url)
        argv = [sys.executable, "-m", "uvicorn", "tasks.web:app", "--host", "0.0.0.0",
                "--port", str(port), "--workers", "1"]  # fmt: skip
        host.web = procs.spawn("web", self._inside(i, argv))
        host.web.wait_ready("the web app's /healthz", lambda: http_ok(f"{url}/healthz"), 60)
        self.start_pump(host)
        return host

    def start_pump(self, host: Host) -> None:
        argv = self._inside(host.index, [celery_bin(), "-A", "worker", "pump"])
        host.pump = host.procs.spawn("pump", argv)
        pump = host.pump
        pump.wait_ready("the pump", lambda: "resuming at LSN" in pump.log_text(), 60)

    def start_customers(self) -> None:
        for host in self.hosts:
            local = host.url if self.net is None else "http://127.0.0.1:8000"
            argv = [sys.executable, PRODUCER, str(host.journal_path), host.prefix, local,
                    str(RATE), "400"]  # fmt: skip
            host.customers = host.procs.spawn("customers", self._inside(host.index, argv))

    def stop(self) -> None:
        for host in self.hosts:
            host.procs.stop_all(timeout=10)
        self.central.stop_all(timeout=10)
        self.redis.kill()
        if self.net is not None:
            self.net.close()

    # ------------------------------------------------------------------ faults
    def cut(self, host: Host) -> contextlib.AbstractContextManager[None]:
        if self.net is not None:
            net, index = self.net, host.index

            @contextlib.contextmanager
            def link_down() -> Iterator[None]:
                net.cut(index)
                try:
                    yield
                finally:
                    net.restore(index)

            return link_down()
        assert host.pump is not None
        return _frozen(host.pump.pid)

    def recovery(self, host: Host, since: float, timeout: float = 120) -> float:
        """Seconds from ``since`` until the host's low water mark passed what was durable
        at that moment."""
        target = host.snapshot().high_water_mark
        wait_until(f"host {host.index} to catch up", lambda: host.snapshot().low_water_mark
                   >= target, timeout, 0.2)  # fmt: skip
        return time.monotonic() - since


@contextlib.contextmanager
def _frozen(pid: int) -> Iterator[None]:
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@pytest.fixture
def cluster(tmp_path: Path, ledger_url: str) -> Iterator[Cluster]:
    hosts = Cluster(tmp_path, ledger_url)
    if hosts.why_not is not None:
        print(f"\nHOSTS: {hosts.why_not}: running the hosts as process groups instead "
              "(the cut-off is a frozen pump)", flush=True)  # fmt: skip
    try:
        hosts.start()
        yield hosts
    finally:
        hosts.stop()


def flowing(cluster: Cluster) -> None:
    from tasks.ledger import Ledger

    def every_host() -> bool:
        book = Ledger(cluster.ledger_url)
        try:
            snap = book.snapshot(TARGETS)
        finally:
            book.close()
        return all(any(p.startswith(f"{h.prefix}-") for p in snap["finance"])
                   for h in cluster.hosts)  # fmt: skip

    wait_until("purchases of every host reaching the ledger", every_host, 90, 0.5)


def test_three_hosts_one_broker_pump_killed_host_cut_off_broker_killed(cluster: Cluster) -> None:
    h0, h1, _ = cluster.hosts
    cluster.start_customers()
    flowing(cluster)
    recoveries: dict[str, float] = {}

    # 1. A host's pump killed and restarted.
    assert h0.pump is not None
    h0.pump.stop(signal.SIGKILL)
    time.sleep(3)
    cluster.start_pump(h0)
    recoveries["pump-kill h0"] = cluster.recovery(h0, time.monotonic())

    # 2. A host cut off from the broker; its web app takes purchases all along.
    before = len(h1.journal().acked)
    cut_at = time.monotonic()
    with cluster.cut(h1):
        time.sleep(CUT_SECONDS)
        during = len(h1.journal().acked) - before
    reconnected = time.monotonic()
    recoveries["cut-off h1"] = cluster.recovery(h1, reconnected)
    assert during >= 0.7 * RATE * CUT_SECONDS, during  # customers did not notice

    # 3. The broker killed and restarted empty: every pump re-sends its window.
    cluster.redis.kill()
    time.sleep(3)
    cluster.redis.start()
    back = time.monotonic()
    for host in cluster.hosts:
        recoveries[f"broker-kill h{host.index}"] = cluster.recovery(host, back)

    for host in cluster.hosts:
        assert host.customers is not None
        host.customers.stop(signal.SIGTERM, timeout=30)
    results = {}
    for host in cluster.hosts:
        journal = host.journal()
        assert journal.acked, f"host {host.index} took no purchase"
        acked = set(journal.acked)

        def drained(host: Host = host, acked: set[str] = acked) -> bool:
            result = audit(acked, acked, cluster.ledger_url, f"{host.prefix}-")
            return not result.lost and host.snapshot().pending == 0

        wait_until(f"host {host.index} drained", drained, 180, 0.5)
        result = audit(journal.attempted, acked, cluster.ledger_url, f"{host.prefix}-")
        assert result.lost == [] and result.double_effects == 0 and result.phantoms == []
        status = subprocess.run([str(Path(sys.executable).with_name("walstore")), "status",
                                 str(host.workdir / "wal"), "--json"], capture_output=True,
                                text=True, timeout=60, check=True)  # fmt: skip
        assert json.loads(status.stdout)["pending"] == 0
        assert DeadLetterStore(str(host.workdir / "wal")).list() == []
        results[host.index] = result
    for what, seconds in recoveries.items():
        assert seconds < 90, (what, seconds)
    mode = "namespaces" if cluster.net is not None else "process groups"
    report(f"hosts ({mode})",
           purchases={h.index: results[h.index].acknowledged for h in cluster.hosts},
           taken_while_cut_off=during, cut_for=f"{reconnected - cut_at:.0f}s",
           recovery={k: f"{v:.1f}s" for k, v in recoveries.items()},
           duplicates={h.index: sum(results[h.index].duplicates.values())
                       for h in cluster.hosts})  # fmt: skip
