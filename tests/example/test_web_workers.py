"""A real ``uvicorn tasks.web:app --workers 4`` on loopback, hit from 8 threads: every
201 has its own LSN, every acknowledged purchase is in the log at that LSN afterwards,
and one scrape of /metrics sums what all the workers counted. The broker URL points at
a closed port: the web app never needs it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from walrelay.record import decode
from walstore import Options, Wal

ROOT = Path(__file__).resolve().parents[2]
WORKERS = 4
REQUESTS = 400
THREADS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    wal_dir: Path
    prom_dir: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # graceful: workers finish their requests
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # our own session: uvicorn + workers
                self.proc.wait(timeout=10)


def wait_until_ready(server: Server, deadline_s: float = 90) -> None:
    """Until every worker has started (uvicorn logs it once per worker) and /healthz is 200.

    uvicorn binds port 0 and logs the port it got: no race for a "free" port."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        assert server.proc.poll() is None, server.log.read_text()
        text = server.log.read_text()
        bound = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", text)
        if bound and text.count("Application startup complete") >= WORKERS:
            server.url = bound.group(1)
            try:
                if httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
        time.sleep(0.2)
    raise AssertionError(f"uvicorn not ready in {deadline_s}s:\n{server.log.read_text()}")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    wal_dir, prom_dir, log = tmp_path / "wal", tmp_path / "prom", tmp_path / "uvicorn.log"
    prom_dir.mkdir()
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        WAL_DIR=str(wal_dir),
        WAL_SEGMENT_BYTES="65536",  # small: workers roll segments over while racing
        PROMETHEUS_MULTIPROC_DIR=str(prom_dir),
        CELERY_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
        LEDGER_URL=f"sqlite:///{tmp_path / 'ledger.sqlite3'}",
    )
    cmd = [sys.executable, "-m", "uvicorn", "tasks.web:app", "--host", "127.0.0.1",
           "--port", "0", "--workers", str(WORKERS), "--log-level", "info"]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    srv = Server(proc, "", log, wal_dir, prom_dir)
    try:
        wait_until_ready(srv)
        yield srv
    finally:
        srv.stop()


def purchase(i: int) -> dict[str, object]:
    return {
        "purchase_id": f"w-{i}",
        "customer": f"customer {i}",
        "items": [{"sku": f"sku-{i % 7}", "qty": 1 + i % 3}],
        "total_cents": 100 * i,
        "currency": "EUR",
    }


def post_all(url: str) -> list[tuple[int, str, int | None]]:
    # No keep-alive: a connection per request, so the kernel spreads them over the workers.
    limits = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(base_url=url, timeout=30, limits=limits) as client:

        def post(i: int) -> tuple[int, str, int | None]:
            r = client.post("/purchases", json=purchase(i))
            lsn = r.json().get("lsn") if r.status_code == 201 else None
            return r.status_code, f"w-{i}", lsn

        with ThreadPoolExecutor(THREADS) as pool:
            started = time.monotonic()
            results = list(pool.map(post, range(REQUESTS)))
            print(f"{REQUESTS} POSTs from {THREADS} threads: {time.monotonic() - started:.2f}s")
            return results


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


@pytest.mark.timeout(240)
def test_four_workers_give_unique_durable_lsns_and_summed_metrics(server: Server) -> None:
    results = post_all(server.url)
    assert [code for code, _, _ in results] == [201] * REQUESTS
    lsns = [lsn for _, _, lsn in results]
    assert sorted(lsns) == list(range(REQUESTS))  # type: ignore[type-var]  # unique, no gap

    def chunked() -> Iterator[bytes]:  # an over-size body with no Content-Length
        for _ in range(17):
            yield b" " * 4096

    big = httpx.post(f"{server.url}/purchases", content=chunked(), timeout=30)
    assert big.status_code == 413
    assert httpx.post(f"{server.url}/purchases", json={}, timeout=30).status_code == 422

    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    post = {"method": "POST", "route": "/purchases"}
    assert metric(text, "walpurchase_http_requests_total", **post, status="201") == REQUESTS
    assert metric(text, "walpurchase_http_requests_total", **post, status="413") == 1
    assert metric(text, "walpurchase_wal_append_seconds_count") == REQUESTS
    assert metric(text, "walpurchase_wal_next_lsn") == REQUESTS
    workers_that_counted = {p.stem.rsplit("_", 1)[1] for p in server.prom_dir.glob("counter_*.db")}
    assert len(workers_that_counted) >= 2, workers_that_counted

    server.stop()
    with Wal.open(server.wal_dir, Options()) as wal:
        stored = {lsn: decode(payload).key for lsn, payload in wal.iter_from(0)}
        segments = wal.status().segments
    assert stored == {lsn: pid for _, pid, lsn in results}
    assert segments >= 2  # the race crossed segment roll-overs
