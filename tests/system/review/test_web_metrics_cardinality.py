"""Attack: any client can grow the web app's /metrics without bound: the HTTP method of
a request is used as a label value as sent, so each made-up method (``M1``, ``M2``, ...)
adds a new ``walpurchase_http_requests_total`` series, kept for the life of the process
and scraped by Prometheus every time. The route label is already bounded ("unmatched"
for unknown paths); the method label is not.

Expected (README, Prometheus section: counters "by method, route template and status"):
a bounded label set, e.g. unknown methods folded into one value such as "other"."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tasks.web import create_app
from tests.example.example_relay import example_relay
from tests.support.web_client import AppClient

pytestmark = pytest.mark.timeout(60)


def test_made_up_methods_do_not_add_metric_series(tmp_path: Path) -> None:
    relay = example_relay(tmp_path / "wal")
    client = AppClient(create_app(relay=lambda: relay))
    try:
        for i in range(50):
            client.request(f"M{i}", "/healthz")
        text = client.get("/metrics").text
    finally:
        client.close()
        relay.close()
    methods = set(re.findall(r'http_requests_total\{method="([^"]*)"', text))
    assert len(methods) <= 10, f"{len(methods)} method label values: {sorted(methods)[:12]}..."
