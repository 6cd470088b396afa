"""The demo (``python -m tools.demo``, what ``make demo`` runs) with a small count and
``--exit``: the whole local stack, purchases over HTTP, a broker restart mid-run, the
summary, and nothing left running afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools.processes import processes_mentioning

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow]


@pytest.mark.timeout(240)
def test_the_demo_delivers_every_purchase_across_a_broker_restart(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    argv = [sys.executable, "-m", "tools.demo", "--count", "300", "--exit", "--json",
            "--workdir", str(workdir)]  # fmt: skip
    out = subprocess.run(argv, cwd=ROOT, env=dict(os.environ, PUMP_ACK_TIMEOUT="5"),
                         capture_output=True, text=True, timeout=220, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["acknowledged"] == summary["attempted"] == 300
    assert summary["refused"] == {}
    assert summary["effects"] == {"warehouse": 300, "finance": 300}
    assert summary["lost"] == 0 and summary["double_effects"] == 0 and summary["phantoms"] == 0
    assert summary["drained"] and summary["recovery"] is not None
    for url in (summary["web_url"], summary["flower_url"]):
        assert url.startswith("http://127.0.0.1:")
    assert "broker killed (-9) and restarted empty" in out.stderr
    assert f"Flower:  {summary['flower_url']}" in out.stderr  # printed at start
    assert processes_mentioning(str(workdir)) == []
