"""docker-compose.yml: what the deployment promises, read from the file itself, and
``docker compose config`` where the docker client and its compose plugin exist (no
engine is needed for it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
SERVICES = {"redis", "web", "pump", "warehouse", "finance", "flower"}
CREDENTIALS = {"FLOWER_USER": "admin", "FLOWER_PASSWORD": "s3cret"}


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())  # resolves the anchors and << merges
    assert isinstance(doc, dict)
    return doc


def command(service: dict[str, Any]) -> list[str]:
    cmd = service["command"]
    return cmd if isinstance(cmd, list) else str(cmd).split()


def named_mounts(service: dict[str, Any]) -> dict[str, str]:
    """{target path: volume name} of a service's short-syntax volume mounts."""
    out = {}
    for entry in service.get("volumes", []):
        source, target = str(entry).split(":")[:2]
        out[target] = source
    return out


def test_services_and_health_checks(spec: dict[str, Any]) -> None:
    services = spec["services"]
    assert set(services) == SERVICES
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"


def test_redis_runs_without_persistence(spec: dict[str, Any]) -> None:
    cmd = command(spec["services"]["redis"])
    assert cmd[0] == "redis-server"
    assert cmd[cmd.index("--save") + 1] == ""
    assert cmd[cmd.index("--appendonly") + 1] == "no"
    assert "redis-cli" in spec["services"]["redis"]["healthcheck"]["test"]


def test_web_and_pump_share_one_wal_volume(spec: dict[str, Any]) -> None:
    web, pump = spec["services"]["web"], spec["services"]["pump"]
    wal_dir = web["environment"]["WAL_DIR"]
    assert pump["environment"]["WAL_DIR"] == wal_dir
    volume = named_mounts(web)[wal_dir]
    assert named_mounts(pump)[wal_dir] == volume
    assert volume in spec["volumes"]  # a named volume, not a host path
    for worker in ("warehouse", "finance", "flower"):  # acks travel through the broker
        assert wal_dir not in named_mounts(spec["services"][worker])


def test_web_serves_four_workers_with_shared_metrics_and_no_broker_dependency(
    spec: dict[str, Any],
) -> None:
    web = spec["services"]["web"]
    cmd = command(web)
    assert cmd[:2] == ["uvicorn", "tasks.web:app"]
    assert cmd[cmd.index("--workers") + 1] == "4"
    assert cmd[cmd.index("--port") + 1] == "8000"
    assert "8000:8000" in web["ports"]
    prom = web["environment"]["PROMETHEUS_MULTIPROC_DIR"]
    assert any(str(t).split(":")[0] == prom for t in web["tmpfs"])  # empty at each start
    assert "redis" not in web.get("depends_on", {})  # purchases go in while Redis is down
    assert "/healthz" in " ".join(web["healthcheck"]["test"])


def test_pump_exports_metrics_and_is_not_scaled(spec: dict[str, Any]) -> None:
    pump = spec["services"]["pump"]
    assert command(pump) == ["celery", "-A", "worker", "pump"]
    port = pump["environment"]["PUMP_METRICS_PORT"]
    assert f"127.0.0.1:{port}/metrics" in " ".join(pump["healthcheck"]["test"])
    assert "deploy" not in pump and "container_name" not in pump


@pytest.mark.parametrize("queue", ["warehouse", "finance"])
def test_workers_are_scalable(spec: dict[str, Any], queue: str) -> None:
    worker = spec["services"][queue]
    cmd = command(worker)
    assert cmd[:4] == ["celery", "-A", "worker", "worker"]
    assert cmd[cmd.index("-Q") + 1] == queue
    # --scale N needs containers without a fixed name or host port.
    assert "container_name" not in worker and "ports" not in worker
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"


def test_flower_requires_basic_auth_credentials(spec: dict[str, Any]) -> None:
    flower = spec["services"]["flower"]
    assert command(flower)[:4] == ["celery", "-A", "worker", "flower"]
    auth = flower["environment"]["FLOWER_BASIC_AUTH"]
    assert "${FLOWER_USER:?" in auth and "${FLOWER_PASSWORD:?" in auth
    assert "5555:5555" in flower["ports"]
    assert "/healthcheck" in " ".join(flower["healthcheck"]["test"])


def test_dockerfile_builds_the_package_on_python_311_slim() -> None:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    assert "FROM python:3.11-slim" in lines
    text = "\n".join(lines)
    assert "pip install ." in text and "USER " in text  # not root at run time


# ------------------------------------------------------------------ docker compose config
def compose_cli() -> list[str] | None:
    """``docker compose`` (the v2 plugin), or None where it is missing."""
    if shutil.which("docker") is None:
        return None
    try:
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return ["docker", "compose"] if probe.returncode == 0 else None


def run_config(cli: list[str], env_extra: dict[str, str], *args: str) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "FLOWER_"))}
    env.update(env_extra)
    return subprocess.run(
        [*cli, "-f", str(COMPOSE), "--project-directory", str(ROOT), "config", *args],
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def cli() -> list[str]:
    found = compose_cli()
    if found is None:
        pytest.skip("no docker client with the compose plugin ('docker compose version' fails)")
    return found


def test_docker_compose_config_accepts_the_file(cli: list[str]) -> None:
    proc = run_config(cli, CREDENTIALS, "--format", "json")
    assert proc.returncode == 0, proc.stderr.decode()
    resolved = json.loads(proc.stdout)
    assert set(resolved["services"]) == SERVICES
    flower_env = resolved["services"]["flower"]["environment"]
    assert flower_env["FLOWER_BASIC_AUTH"] == "admin:s3cret"
    web_vols = {v["target"]: v["source"] for v in resolved["services"]["web"]["volumes"]}
    pump_vols = {v["target"]: v["source"] for v in resolved["services"]["pump"]["volumes"]}
    wal_dir = resolved["services"]["web"]["environment"]["WAL_DIR"]
    assert web_vols[wal_dir] == pump_vols[wal_dir] == "wal"


@pytest.mark.parametrize("missing", ["FLOWER_USER", "FLOWER_PASSWORD"])
def test_docker_compose_config_refuses_missing_flower_credentials(
    cli: list[str], missing: str
) -> None:
    env = {k: v for k, v in CREDENTIALS.items() if k != missing}
    proc = run_config(cli, env, "--quiet")
    assert proc.returncode != 0
    assert missing in proc.stderr.decode()
