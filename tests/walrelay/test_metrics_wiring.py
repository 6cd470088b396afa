"""Metrics wired into the entry points: the pump's exporter end to end (``celery -A worker
pump`` with PUMP_METRICS_PORT, a private redis-server and a real worker, scraped over
HTTP), and the fsync latency histogram of the web app's own log on its /metrics."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import tasks.app
from tasks.web import create_app
from tests.support.stack import Stack, free_port, wait_until
from tests.support.web_client import AppClient
from tools.processes import StackError

NS = "walpurchase_"


def unlabelled(text: str) -> dict[str, float]:
    """{sample name without the namespace: value} of the samples without labels."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.labels:
                out[sample.name.removeprefix(NS)] = sample.value
    return out


def scrape(url: str) -> dict[str, float] | None:
    """The unlabelled samples served at ``url``; None if nothing answers there."""
    try:
        response = httpx.get(url, timeout=5)
    except httpx.TransportError:
        return None
    assert response.status_code == 200
    return unlabelled(response.text)


def scrape_until(url: str, what: str, expected: dict[str, float]) -> dict[str, float]:
    """Scrape until every sample in ``expected`` has its value (gauges lag up to ~1 s)."""

    def matches() -> dict[str, float] | None:
        got = scrape(url)
        if got is None or any(got.get(k) != v for k, v in expected.items()):
            return None
        return got

    try:
        return wait_until(what, matches, 20, 0.2)  # type: ignore[no-any-return]
    except StackError:  # a timeout: say what the last scrape showed
        got = scrape(url) or {}
        last = {k: got.get(k) for k in expected}
        raise AssertionError(f"{what}: expected {expected}, last scrape {last}") from None


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_pump_exports_its_progress_while_running(stack: Stack) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    pump = stack.start_pump(env={"PUMP_METRICS_PORT": str(port)})
    wait_until("the exporter serving", lambda: scrape(url), 20, 0.1)
    assert f"pump: metrics on http://127.0.0.1:{port}/metrics" in stack.log_of(pump)
    stack.produce(1, 5, prefix="m")

    # No worker yet: every task is published, nothing acked, all five entries pending.
    queued = scrape_until(
        url,
        "published, not acked",
        {"pump_published_total": 10, "pump_acked_total": 0, "pump_in_flight_entries": 5,
         "pump_backlog_entries": 5, "pump_low_water_mark": 0, "pump_high_water_mark": 5},
    )  # fmt: skip
    assert queued["pump_up"] == 1 and queued["wal_up"] == 1
    assert queued["wal_next_lsn"] == 5 and queued["wal_high_water_mark"] == 5
    assert queued["pump_oldest_unconfirmed_age_seconds"] > 0
    assert queued["pump_redelivered_total"] == 0 and queued["pump_dead_lettered_total"] == 0

    stack.start_worker()
    done = scrape_until(
        url,
        "all acked",
        {"pump_acked_total": 10, "pump_in_flight_entries": 0, "pump_backlog_entries": 0,
         "pump_low_water_mark": 5, "pump_high_water_mark": 5, "wal_low_water_mark": 5,
         "wal_pending_entries": 0},
    )  # fmt: skip
    assert done["pump_published_total"] == 10  # nothing was sent twice
    assert done["pump_oldest_unconfirmed_age_seconds"] == 0
    assert done["pump_entries_done_total"] == 5
    assert done["wal_segments"] >= 1 and done["wal_bytes"] > 0

    assert stack.stop(pump) == 0
    assert scrape(url) is None  # the exporter stopped with the pump: the port is free


@pytest.mark.timeout(60)
def test_a_bad_metrics_port_stops_the_pump_with_a_clear_message(stack: Stack) -> None:
    out = stack.celery("pump", env={"PUMP_METRICS_PORT": "http"})
    assert out.returncode == 1
    assert "cannot serve metrics: PUMP_METRICS_PORT='http' is not a TCP port" in out.stderr


@pytest.mark.timeout(60)
def test_the_web_apps_metrics_time_the_fsyncs_of_its_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default log of the web app (``WAL_DIR``, opened on first use) is opened with
    the fsync-timing file layer, so /metrics has the fdatasync latency histogram."""
    monkeypatch.setenv("WAL_SYNC", "always")
    monkeypatch.setenv("WAL_SEGMENT_BYTES", "16384")
    monkeypatch.setenv("WAL_DIR", str(tmp_path / "wal"))
    monkeypatch.setattr(tasks.app, "_app", None)  # this test's own app (restored after)
    client = AppClient(create_app())
    purchase = {"customer": "Ada", "items": [{"sku": "s", "qty": 1}], "total_cents": 100,
                "currency": "EUR"}  # fmt: skip
    try:
        before = unlabelled(client.get("/metrics").text)  # opens the log
        for _ in range(3):
            assert client.post("/purchases", json=purchase).status_code == 201
        after = unlabelled(client.get("/metrics").text)
    finally:
        client.close()
        tasks.app.get_app().relay.close()  # this process's handles
    # One thread appending: every append is its own flush (group commit has no one to
    # share it with), each timed. More would be fine; none would mean no timing at all.
    assert after["wal_fsync_seconds_count"] - before.get("wal_fsync_seconds_count", 0) >= 3
    assert after["wal_fsync_seconds_sum"] > before.get("wal_fsync_seconds_sum", 0)
    assert after["wal_append_seconds_count"] - before.get("wal_append_seconds_count", 0) == 3
    assert after["wal_next_lsn"] == 3
