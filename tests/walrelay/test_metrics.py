"""Metrics: WAL gauges read at scrape time, pump metrics from a stats object, the pump's
HTTP exporter, fsync timing, the web app's /metrics, and multi-process summing."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tasks.web import create_app
from tests.example.example_relay import example_relay
from tests.support.web_client import AppClient
from walrelay.metrics import (
    PUMP_FIELDS,
    FsyncTimingFs,
    PumpCollector,
    WalCollector,
    exporter_from_env,
    pump_registry,
    start_exporter,
)
from walrelay.pump import PumpStats
from walstore import Options, Wal

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[2]
SMALL = 8192


def samples(text: str | bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a Prometheus text exposition."""
    if isinstance(text, bytes):
        text = text.decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str | bytes, name: str, **labels: str) -> float | None:
    return samples(text).get((name, tuple(sorted(labels.items()))))


def scrape(*collectors: object) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    for c in collectors:
        registry.register(c)  # type: ignore[arg-type]
    return generate_latest(registry)


@pytest.fixture
def wal(tmp_path: Path) -> Iterator[Wal]:
    log = Wal.open(tmp_path / "wal", Options(segment_bytes=SMALL))
    yield log
    log.close()


# ------------------------------------------------------------------ WAL gauges
def test_wal_gauges_follow_the_log(wal: Wal) -> None:
    collector = WalCollector(lambda: wal)
    assert value(scrape(collector), "walpurchase_wal_next_lsn") == 0
    for _ in range(100):  # ~ 10 KiB: rolls over to a second segment
        wal.append(b"x" * 80)
    wal.set_low_water_mark(30)
    text = scrape(collector)
    st = wal.status()
    assert value(text, "walpurchase_wal_up") == 1
    assert value(text, "walpurchase_wal_next_lsn") == 100 == st.next_lsn
    assert value(text, "walpurchase_wal_high_water_mark") == 100
    assert value(text, "walpurchase_wal_low_water_mark") == 30
    assert value(text, "walpurchase_wal_pending_entries") == 70
    assert value(text, "walpurchase_wal_segments") == st.segments >= 2
    assert value(text, "walpurchase_wal_bytes") == st.bytes > 8000
    assert value(text, "walpurchase_wal_poisoned") == 0


def test_wal_gauges_are_shared_state_read_from_any_handle(tmp_path: Path, wal: Wal) -> None:
    """Another process's appends show in this process's scrape: nothing is per-process."""
    script = textwrap.dedent(f"""
        from walstore import Options, Wal
        with Wal.open({str(tmp_path / "wal")!r}, Options(segment_bytes={SMALL})) as w:
            for _ in range(7):
                w.append(b"from another process")
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=30)
    assert value(scrape(WalCollector(lambda: wal)), "walpurchase_wal_next_lsn") == 7


def test_wal_collector_reports_down_instead_of_failing_the_scrape() -> None:
    def unavailable() -> Wal:
        raise OSError("no such directory")

    text = scrape(WalCollector(unavailable))
    assert value(text, "walpurchase_wal_up") == 0
    assert value(text, "walpurchase_wal_next_lsn") is None


# ------------------------------------------------------------------ pump metrics
def test_pump_collector_exports_the_pump_stats() -> None:
    stats = PumpStats(
        published=12, redelivered=2, acked=9, dead_lettered=1, in_flight=3, backlog=4,
        oldest_unconfirmed_age=2.5, low_water_mark=40, high_water_mark=44, broker_down=True,
    )  # fmt: skip
    text = scrape(PumpCollector(lambda: stats))
    assert value(text, "walpurchase_pump_up") == 1
    assert value(text, "walpurchase_pump_published_total") == 12
    assert value(text, "walpurchase_pump_redelivered_total") == 2
    assert value(text, "walpurchase_pump_acked_total") == 9
    assert value(text, "walpurchase_pump_dead_lettered_total") == 1
    assert value(text, "walpurchase_pump_in_flight_entries") == 3
    assert value(text, "walpurchase_pump_backlog_entries") == 4
    assert value(text, "walpurchase_pump_oldest_unconfirmed_age_seconds") == 2.5
    assert value(text, "walpurchase_pump_low_water_mark") == 40
    assert value(text, "walpurchase_pump_high_water_mark") == 44
    assert value(text, "walpurchase_pump_broker_down") == 1
    # Every field of the pump's stats is exported, and nothing else: none goes missing.
    assert {attr for attr, *_ in PUMP_FIELDS} == set(stats.as_dict())


def test_pump_collector_reads_at_scrape_time_and_skips_missing_fields() -> None:
    @dataclass
    class Partial:
        published: int = 0

    current = Partial()
    collector = PumpCollector(lambda: current)
    assert value(scrape(collector), "walpurchase_pump_published_total") == 0
    current.published = 5
    text = scrape(collector)
    assert value(text, "walpurchase_pump_published_total") == 5
    assert value(text, "walpurchase_pump_acked_total") is None
    mapping = scrape(PumpCollector(lambda: {"acked": 3, "backlog": None}))
    assert value(mapping, "walpurchase_pump_acked_total") == 3
    assert value(mapping, "walpurchase_pump_backlog_entries") is None


def test_pump_collector_reports_down_when_stats_fail() -> None:
    def broken() -> object:
        raise RuntimeError("pump not started")

    text = scrape(PumpCollector(broken))
    assert value(text, "walpurchase_pump_up") == 0
    assert value(text, "walpurchase_pump_published_total") is None


def test_exporter_serves_pump_and_wal_metrics_on_loopback(wal: Wal) -> None:
    stats = PumpStats(published=3, acked=2)
    wal.append(b"one")
    exporter = start_exporter(pump_registry(lambda: stats, lambda: wal), port=0)
    try:
        assert exporter.server.server_address[0] == "127.0.0.1"
        url = f"http://127.0.0.1:{exporter.port}/metrics"
        first = httpx.get(url, timeout=10)
        stats.acked = 3
        second = httpx.get(url, timeout=10).text
    finally:
        exporter.close()
    assert first.status_code == 200
    assert value(first.text, "walpurchase_pump_published_total") == 3
    assert value(first.text, "walpurchase_pump_acked_total") == 2
    assert value(second, "walpurchase_pump_acked_total") == 3
    assert value(second, "walpurchase_wal_next_lsn") == 1
    with pytest.raises(httpx.TransportError):
        httpx.get(url, timeout=2)  # closed: the port is free again


def test_exporter_from_env() -> None:
    registry = pump_registry(lambda: PumpStats())
    assert exporter_from_env(registry, {}) is None
    assert exporter_from_env(registry, {"PUMP_METRICS_PORT": " "}) is None
    for bad in ("http", "70000", "-1"):
        with pytest.raises(ValueError, match="PUMP_METRICS_PORT"):
            exporter_from_env(registry, {"PUMP_METRICS_PORT": bad})
    exporter = exporter_from_env(registry, {"PUMP_METRICS_PORT": "0"})
    assert exporter is not None
    try:
        assert exporter.server.server_address[0] == "127.0.0.1" and exporter.port > 0
        r = httpx.get(f"http://127.0.0.1:{exporter.port}/metrics", timeout=10)
        assert value(r.text, "walpurchase_pump_up") == 1
    finally:
        exporter.close()


# ------------------------------------------------------------------ latency histograms
def test_fsync_timing_fs_times_every_segment_fsync(tmp_path: Path) -> None:
    histogram = Histogram("t_fsync_seconds", "test", registry=None)
    with Wal.open(
        tmp_path / "timed", Options(segment_bytes=SMALL, fs=FsyncTimingFs(histogram))
    ) as w:
        before = value(scrape(histogram), "t_fsync_seconds_count") or 0
        for _ in range(3):
            w.append(b"durable")  # one thread: each append flushes once
        after = value(scrape(histogram), "t_fsync_seconds_count")
    assert after == before + 3


def test_web_metrics_count_requests_and_time_appends(tmp_path: Path) -> None:
    relay = example_relay(tmp_path / "web")
    client = AppClient(create_app(relay=lambda: relay))
    try:
        before = client.get("/metrics").text
        good = {
            "customer": "a",
            "items": [{"sku": "s", "qty": 1}],
            "total_cents": 1,
            "currency": "EUR",
        }
        for _ in range(3):
            assert client.post("/purchases", json=good).status_code == 201
        assert client.post("/purchases", json={}).status_code == 422
        assert client.post("/purchases", content=b"x" * 70_000).status_code == 413
        after = client.get("/metrics")
    finally:
        client.close()
        relay.close()
    assert after.headers["content-type"].startswith("text/plain")

    def delta(name: str, **labels: str) -> float:
        return (value(after.text, name, **labels) or 0) - (value(before, name, **labels) or 0)

    post = {"method": "POST", "route": "/purchases"}
    assert delta("walpurchase_http_requests_total", **post, status="201") == 3
    assert delta("walpurchase_http_requests_total", **post, status="422") == 1
    assert delta("walpurchase_http_requests_total", **post, status="413") == 1
    assert delta("walpurchase_wal_append_seconds_count") == 3
    assert value(after.text, "walpurchase_wal_next_lsn") == 3


@pytest.mark.timeout(90)
def test_multiprocess_mode_sums_every_worker(tmp_path: Path) -> None:
    """Two processes count into PROMETHEUS_MULTIPROC_DIR; a third renders the sum, as any
    uvicorn worker does for GET /metrics."""
    prom = tmp_path / "prom"
    prom.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT), PROMETHEUS_MULTIPROC_DIR=str(prom))
    count = textwrap.dedent("""
        import sys
        from walrelay.metrics import web_metrics
        m = web_metrics()
        for _ in range(int(sys.argv[1])):
            m.requests.labels("POST", "/purchases", "201").inc()
            m.append_seconds.observe(0.001)
    """)
    for n in ("2", "5"):
        subprocess.run([sys.executable, "-c", count, n], env=env, check=True, timeout=30)
    render = (
        "import sys, walrelay.metrics as m; sys.stdout.write(m.render_web_metrics(None).decode())"
    )
    out = subprocess.run(
        [sys.executable, "-c", render], env=env, check=True, timeout=30, capture_output=True
    ).stdout.decode()
    labels = {"method": "POST", "route": "/purchases", "status": "201"}
    assert value(out, "walpurchase_http_requests_total", **labels) == 7
    assert value(out, "walpurchase_wal_append_seconds_count") == 7


def test_every_pump_metric_the_docs_name_is_served(tmp_path: Path) -> None:
    """docs/deployment.md told operators to alert on walrelay_* names the pump never
    served (review): every walpurchase_pump_/wal_ name in the docs and README exists."""
    import re

    with Wal.open(tmp_path / "wal", Options(segment_bytes=SMALL, min_free_bytes=0)) as wal:
        text = generate_latest(pump_registry(lambda: PumpStats(), lambda: wal)).decode()
    served = {f.name for f in text_string_to_metric_families(text)}
    served |= {f"{name}_total" for name in served}  # counters are named without _total
    deployment = (ROOT / "docs" / "deployment.md").read_text()
    named = set(re.findall(r"\bwal\w*_(?:pump|wal)_[a-z_]*[a-z]", deployment))
    # The README's table of the pump's metrics names them without the prefix.
    rows = [r for r in (ROOT / "README.md").read_text().splitlines() if r.startswith("| pump |")]
    in_readme = {f"walpurchase_{n}" for r in rows for n in re.findall(r"`((?:pump|wal)_\w+)`", r)}
    assert named and in_readme
    assert named <= served, sorted(named - served)
    assert in_readme <= served, sorted(in_readme - served)
