"""Settings from the environment: defaults that work on one machine, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.app import celery_config, create_app
from tasks.config import Settings
from walrelay import settings as walrelay_settings
from walrelay.commands.pump import pump_config

pytestmark = pytest.mark.timeout(10)


def test_defaults() -> None:
    s = Settings.from_env({})
    assert s.broker_url == "redis://127.0.0.1:6379/0"
    assert s.wal_dir == "./var/wal"
    assert s.ledger_url.startswith("sqlite:///var/")
    assert s.warehouse_reject_skus == frozenset()


def test_environment_overrides() -> None:
    s = Settings.from_env({
        "CELERY_BROKER_URL": "rediss://:secret@redis.example:6380/1",
        "WAL_DIR": "/data/wal", "LEDGER_URL": "postgresql://u@db/ledger",
        "PUMP_WINDOW": "500", "PUMP_ACK_TIMEOUT": "2.5", "PUMP_MAX_ATTEMPTS": "2",
        "WAREHOUSE_REJECT_SKUS": " a, b ,,",
    })  # fmt: skip
    assert (s.broker_url, s.wal_dir, s.ledger_url) == (
        "rediss://:secret@redis.example:6380/1", "/data/wal", "postgresql://u@db/ledger",
    )  # fmt: skip
    assert (s.relay.pump_window, s.relay.pump_ack_timeout, s.relay.pump_max_attempts) == (
        500,
        2.5,
        2,
    )
    assert s.warehouse_reject_skus == {"a", "b"}
    cfg = pump_config(s.relay)
    assert (cfg.window, cfg.ack_timeout, cfg.max_attempts) == (500, 2.5, 2)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [("PUMP_WINDOW", "many", "not an integer"), ("PUMP_WINDOW", "0", "at least 1"),
     ("PUMP_ACK_TIMEOUT", "soon", "not a number")],
)  # fmt: skip
def test_bad_values_name_the_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"{name}.*{message}"):
        Settings.from_env({name: value})


def test_celery_config_is_json_only_and_late_acking() -> None:
    conf = celery_config(Settings())
    assert conf["accept_content"] == ["json"] and conf["task_serializer"] == "json"
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["broker_connection_max_retries"] is None
    assert conf["worker_send_task_events"] and conf["task_send_sent_event"]
    assert conf["broker_transport_options"]["visibility_timeout"] == 3600.0


def test_the_producers_default_log_is_the_relays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``record_purchase`` without WAL_DIR appends where the pump reads by default: one
    default (walrelay's), not a second literal in the example."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WAL_DIR", raising=False)
    monkeypatch.setattr(walrelay_settings, "DEFAULT_WAL_DIR", "./moved/wal")
    from walrelay import Relay

    relay = Relay(create_app(Settings.from_env({})))
    assert relay.wal_dir == str(tmp_path / "moved" / "wal")


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e999"])
def test_a_setting_must_be_a_finite_number(value: str) -> None:
    with pytest.raises(ValueError, match=r"PUMP_RETRY_DELAY.*finite"):
        Settings.from_env({"PUMP_RETRY_DELAY": value})


def test_a_missing_dead_letter_is_named_without_quotes() -> None:
    from walrelay import DeadLetterNotFoundError

    assert str(DeadLetterNotFoundError("no dead letter 999")) == "no dead letter 999"
