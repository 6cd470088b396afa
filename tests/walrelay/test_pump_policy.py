"""What ``celery pump`` may publish: the policy it builds from its app and settings."""

from __future__ import annotations

import pytest
from celery import Celery
from kombu import Queue

from tasks.app import create_app
from tasks.config import Settings
from tasks.targets import FINANCE, TASK_NAMES, WAREHOUSE
from walrelay.policy import app_policy
from walrelay.record import TaskSpec
from walrelay.settings import RelaySettings

pytestmark = pytest.mark.timeout(30)


def test_the_example_app_allows_its_tasks_and_nothing_else() -> None:
    app = create_app(Settings(broker_url="memory://"))
    try:
        policy = app_policy(app)
    finally:
        app.close()
    assert policy(TaskSpec("w", TASK_NAMES[WAREHOUSE], "warehouse")) is None
    assert policy(TaskSpec("f", TASK_NAMES[FINANCE], "finance")) is None
    assert "Celery's own" in (policy(TaskSpec("x", "celery.chord_unlock", "warehouse")) or "")
    assert "not registered" in (policy(TaskSpec("x", "os.system", "warehouse")) or "")
    assert "reserved" in (policy(TaskSpec("x", TASK_NAMES[WAREHOUSE], "unacked")) or "")
    assert policy(TaskSpec("x", TASK_NAMES[WAREHOUSE], "any-queue")) is None  # no queue list set


def test_queues_come_from_pump_queues_else_task_queues() -> None:
    app = Celery("q", broker="memory://", set_as_current=False)

    @app.task(name="q.t")
    def t() -> None: ...

    assert app_policy(app)(TaskSpec("x", "q.t", "anywhere")) is None
    app.conf.task_queues = [Queue("alpha"), Queue("beta")]
    policy = app_policy(app)
    assert policy(TaskSpec("x", "q.t", "alpha")) is None
    assert "not one the pump may publish to" in (policy(TaskSpec("x", "q.t", "gamma")) or "")
    settings = RelaySettings.from_env({"PUMP_QUEUES": " gamma, delta ,"})
    assert settings.pump_queues == ("gamma", "delta")
    policy = app_policy(app, settings.pump_queues)
    assert policy(TaskSpec("x", "q.t", "gamma")) is None
    assert policy(TaskSpec("x", "q.t", "alpha")) is not None


def test_new_pump_settings_are_read_and_checked() -> None:
    s = RelaySettings.from_env({"PUMP_STALL_TIMEOUT": "600", "PUMP_CARRY_AFTER": "120"})
    assert (s.pump_stall_timeout, s.pump_carry_after, s.pump_queues) == (600.0, 120.0, ())
    with pytest.raises(ValueError, match="PUMP_STALL_TIMEOUT"):
        RelaySettings.from_env({"PUMP_STALL_TIMEOUT": "soon"})
