"""Fault cases that are long on some brokers only (``faultkit.slow_on``) get the ``slow``
marker for those brokers' parameters, so that ``-m "not slow"`` keeps them out."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        kinds = getattr(getattr(item, "function", None), "slow_on", ())
        callspec = getattr(item, "callspec", None)
        if kinds and callspec is not None and callspec.params.get("pipe") in kinds:
            item.add_marker(pytest.mark.slow)
