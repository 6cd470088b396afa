"""Relay(app) at worker start: the app's workers use walrelay's consumer unless the app
configured one itself, Celery's own included."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery

from walrelay import Relay
from walrelay.relay import CONSUMER, _use_consumer

pytestmark = pytest.mark.timeout(10)
CELERYS = "celery.worker.consumer:Consumer"


class Worker:
    def __init__(self, app: Celery) -> None:
        self.app = app


def started(app: Celery) -> Any:
    _use_consumer(sender="w@h", instance=Worker(app), conf=app.conf)
    return app.conf.worker_consumer


def test_walrelays_consumer_by_default() -> None:
    app = Celery("a", set_as_current=False)
    Relay(app)
    assert started(app) == CONSUMER


@pytest.mark.parametrize("how", ["attribute", "config_from_object"])
def test_a_consumer_the_app_chose_is_kept_even_celerys_own(how: str) -> None:
    app = Celery("b", set_as_current=False)
    if how == "attribute":
        app.conf.worker_consumer = CELERYS
    else:

        class Config:
            worker_consumer = CELERYS

        app.config_from_object(Config)
    Relay(app)
    assert started(app) == CELERYS


def test_apps_without_a_relay_are_left_alone() -> None:
    app = Celery("c", set_as_current=False)
    assert started(app) == CELERYS
