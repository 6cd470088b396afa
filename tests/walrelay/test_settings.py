"""The relay's settings: read from the environment in one place (``RelaySettings``), each
default one constant that every user of it refers to."""

from __future__ import annotations

import dataclasses

import pytest

from walrelay import settings
from walrelay.commands.pump import pump_config
from walrelay.settings import MetricsSettings, RelaySettings
from walrelay.window import PumpConfig

pytestmark = pytest.mark.timeout(10)

# PumpConfig field: the constant of walrelay.settings it takes its default from.
SHARED_DEFAULTS = {
    "window": "DEFAULT_PUMP_WINDOW",
    "ack_timeout": "DEFAULT_ACK_TIMEOUT",
    "max_ack_timeout": "DEFAULT_MAX_ACK_TIMEOUT",
    "retry_delay": "DEFAULT_RETRY_DELAY",
    "max_attempts": "DEFAULT_MAX_ATTEMPTS",
}


def test_the_pumps_defaults_are_the_settings_constants() -> None:
    fields = {f.name: f.default for f in dataclasses.fields(PumpConfig)}
    for name, constant in SHARED_DEFAULTS.items():
        # The same object, not an equal second literal that may drift apart one day.
        assert fields[name] is getattr(settings, constant), name
    # So a pump built without settings behaves like `celery pump` without PUMP_* set.
    from_env = pump_config(RelaySettings.from_env({}))
    assert {n: getattr(from_env, n) for n in SHARED_DEFAULTS} == {
        n: getattr(PumpConfig(), n) for n in SHARED_DEFAULTS
    }


def test_metrics_settings_are_read_in_the_settings_module() -> None:
    default = MetricsSettings.from_env({})
    assert default.port is None  # no exporter unless asked for
    assert default.addr == "127.0.0.1"
    s = MetricsSettings.from_env({"PUMP_METRICS_PORT": " 9100 ", "PUMP_METRICS_ADDR": "0.0.0.0"})
    assert (s.port, s.addr) == (9100, "0.0.0.0")
    assert MetricsSettings.from_env({"PUMP_METRICS_PORT": "0"}).port == 0
    assert MetricsSettings.from_env({"PUMP_METRICS_PORT": " "}).port is None


@pytest.mark.parametrize("bad", ["http", "-1", "65536", "1.5"])
def test_a_bad_metrics_port_is_refused_by_name(bad: str) -> None:
    with pytest.raises(ValueError, match=f"PUMP_METRICS_PORT='{bad}' is not a TCP port"):
        MetricsSettings.from_env({"PUMP_METRICS_PORT": bad})


def test_a_bad_metrics_port_does_not_stop_the_app_from_loading() -> None:
    """Only the pump serves metrics: the workers' and the web app's settings ignore it."""
    env = {"PUMP_METRICS_PORT": "http"}
    assert RelaySettings.from_env(env) == RelaySettings.from_env({})
