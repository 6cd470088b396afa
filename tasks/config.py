"""Settings of the example: one frozen dataclass, read from the environment only by
``Settings.from_env`` (called by ``create_app``, never at import). The relay's own
settings (``WAL_DIR``, ``PUMP_*``) are walrelay's ``RelaySettings``, read here too so
that the example has one place for its configuration."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from walrelay import RelaySettings
from walrelay.settings import env_float

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
DEFAULT_LEDGER_URL = "sqlite:///var/ledger.sqlite3"
DEFAULT_VISIBILITY_TIMEOUT = 3600.0


def _transport_options(raw: str) -> dict[str, Any]:
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"BROKER_TRANSPORT_OPTIONS is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError("BROKER_TRANSPORT_OPTIONS must be a JSON object")
    return value


@dataclass(frozen=True)
class Settings:
    # The broker: redis://, rediss://, sentinel:// or amqp:// (passwords and TLS work).
    broker_url: str = DEFAULT_BROKER_URL
    # Extra kombu transport options, e.g. {"master_name": "mymaster"} for sentinel://.
    # They override the defaults of tasks.app.celery_config.
    broker_transport_options: Mapping[str, Any] = field(default_factory=dict)
    # Where the demo warehouse and finance record their effects (any SQLAlchemy URL).
    ledger_url: str = DEFAULT_LEDGER_URL
    # Redis only: a task fetched but not acknowledged within this many seconds is handed
    # to another worker. A task running longer runs twice (our idempotency absorbs it);
    # too short a value makes every slow task a duplicate, too long delays recovery of
    # tasks held by a worker that died. The pump's own redelivery does not depend on it.
    visibility_timeout: float = DEFAULT_VISIBILITY_TIMEOUT
    # Demo fault injection: SKUs the demo warehouse refuses with an error, to show dead
    # letters and replay. Empty in production.
    warehouse_reject_skus: frozenset[str] = field(default_factory=frozenset)
    # The relay's settings: WAL_DIR, PUMP_*, the idempotency window.
    relay: RelaySettings = field(default_factory=RelaySettings)

    @property
    def wal_dir(self) -> str:
        return self.relay.wal_dir

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``CELERY_BROKER_URL``, ``BROKER_TRANSPORT_OPTIONS``,
        ``LEDGER_URL``, ``BROKER_VISIBILITY_TIMEOUT``, ``WAREHOUSE_REJECT_SKUS`` and the
        relay's variables."""
        env = os.environ if env is None else env
        skus = env.get("WAREHOUSE_REJECT_SKUS", "")
        return cls(
            broker_url=env.get("CELERY_BROKER_URL") or DEFAULT_BROKER_URL,
            broker_transport_options=_transport_options(env.get("BROKER_TRANSPORT_OPTIONS", "")),
            ledger_url=env.get("LEDGER_URL") or DEFAULT_LEDGER_URL,
            visibility_timeout=env_float(
                env, "BROKER_VISIBILITY_TIMEOUT", DEFAULT_VISIBILITY_TIMEOUT, 1.0
            ),
            warehouse_reject_skus=frozenset(s.strip() for s in skus.split(",") if s.strip()),
            relay=RelaySettings.from_env(env),
        )
