"""The web app with a bad setting: it reads the environment on the first request, and a
bad value (PUMP_*, WAL_*) made every POST and /healthz a bare 500. It is a 503 naming the
setting, nothing appended."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.app import create_app as create_celery_app
from tasks.config import Settings
from tasks.web import create_app
from tests.support.web_client import AppClient
from walrelay import Relay, RelaySettings
from walstore import Options

pytestmark = pytest.mark.timeout(60)

PURCHASE = {"customer": "ada", "items": [{"sku": "tea", "qty": 1}], "total_cents": 100,
            "currency": "EUR"}  # fmt: skip


def bad_settings() -> Relay:
    RelaySettings.from_env({"PUMP_WINDOW": "abc"})  # what get_app() meets
    raise AssertionError("unreachable")


def bad_log_options(wal_dir: Path) -> Relay:
    settings = RelaySettings(wal_dir=str(wal_dir))
    app = create_celery_app(Settings(relay=settings))
    return Relay(app, str(wal_dir), settings=settings,
                 wal_options=lambda: Options.from_env({"WAL_SYNC": "sometimes"}))  # fmt: skip


@pytest.mark.parametrize("case", ["PUMP_WINDOW", "WAL_SYNC"])
def test_a_bad_setting_is_a_503_naming_it(tmp_path: Path, case: str) -> None:
    made = bad_log_options(tmp_path / "wal") if case == "WAL_SYNC" else None

    def relay() -> Relay:
        return made if made is not None else bad_settings()

    client = AppClient(create_app(relay=relay, ledger_status=lambda pid: {}))
    try:
        for answer in (client.post("/purchases", json=PURCHASE), client.get("/healthz")):
            assert answer.status_code == 503, answer.text
            assert case in answer.json()["detail"], answer.text
    finally:
        client.close()
    assert not any((tmp_path / "wal").glob("*.seg"))  # nothing appended


_MISSING_METRICS_DIR = """
import json, sys
from tasks.web import create_app
from tests.support.web_client import AppClient
client = AppClient(create_app(ledger_status=lambda pid: {}))
post = client.post("/purchases", json=json.loads(sys.argv[1]))
health = client.get("/healthz")
print(json.dumps([post.status_code, post.json()["detail"], health.status_code,
                  health.json()["detail"]]))
client.close()
"""


def test_a_missing_metrics_directory_is_a_setting_not_the_log(tmp_path: Path) -> None:
    """With PROMETHEUS_MULTIPROC_DIR naming no directory, every POST and /healthz said
    "the write-ahead log is unavailable" (review 4): it is a setting to fix, named."""
    import json
    import os
    import subprocess
    import sys

    from tools.localstack import ROOT

    env = {k: v for k, v in os.environ.items() if not k.startswith(("WAL_", "PUMP_"))}
    env.update(WAL_DIR=str(tmp_path / "wal"), CELERY_BROKER_URL="redis://127.0.0.1:1/0",
               PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "nonexistent"))  # fmt: skip
    command = [sys.executable, "-c", _MISSING_METRICS_DIR, json.dumps(PURCHASE)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    post_code, post_detail, health_code, health_detail = json.loads(done.stdout)
    assert (post_code, health_code) == (503, 503)
    for detail in (post_detail, health_detail):
        assert "misconfigured" in detail and "PROMETHEUS_MULTIPROC_DIR" in detail, detail
    assert not any((tmp_path / "wal").glob("*.seg"))  # nothing appended
