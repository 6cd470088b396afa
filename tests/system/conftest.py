"""Fault cases that are long on some brokers only (``faultkit.slow_on``) get the ``slow``
and ``soak`` markers for those brokers' parameters: the default suite runs them on the
other brokers, ``make soak`` on these (the default suite must stay under 20 minutes on
this machine class; it took 20.4 min with them on 2026-11-30)."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        kinds = getattr(getattr(item, "function", None), "slow_on", ())
        callspec = getattr(item, "callspec", None)
        if kinds and callspec is not None and callspec.params.get("pipe") in kinds:
            item.add_marker(pytest.mark.slow)
            item.add_marker(pytest.mark.soak)
