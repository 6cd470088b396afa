"""Settings of the Celery side: one frozen dataclass, read from the environment only by
``Settings.from_env`` (called by ``create_app`` and the CLIs, never at import)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
DEFAULT_WAL_DIR = "./var/wal"
DEFAULT_LEDGER_URL = "sqlite:///var/ledger.sqlite3"


def _float(env: Mapping[str, str], name: str, default: float, minimum: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if value < minimum:
        raise ValueError(f"{name}={raw!r} must be at least {minimum}")
    return value


def _int(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"{name}={raw!r} must be at least {minimum}")
    return value


@dataclass(frozen=True)
class Settings:
    # The broker (Redis by default; rediss:// and passwords work, AMQP should too).
    broker_url: str = DEFAULT_BROKER_URL
    # The write-ahead log the producers append to and the pump reads.
    wal_dir: str = DEFAULT_WAL_DIR
    # Where the demo warehouse and finance record their effects (any SQLAlchemy URL).
    ledger_url: str = DEFAULT_LEDGER_URL
    # Redis only: a task fetched but not acknowledged within this many seconds is handed
    # to another worker. A task running longer runs twice (our idempotency absorbs it);
    # too short a value makes every slow task a duplicate, too long delays recovery of
    # tasks held by a worker that died. The pump's own redelivery does not depend on it.
    visibility_timeout: float = 3600.0
    # Most WAL entries the pump keeps unconfirmed at once: bounds its memory and the
    # number of duplicates a broker restart can cause.
    pump_window: int = 10_000
    # Seconds without an ack before the pump suspects a published task is lost.
    pump_ack_timeout: float = 30.0
    # A task unconfirmed this long is published again even with no sign that the
    # workers moved past it (covers a silent loss on an idle system).
    pump_max_ack_timeout: float = 300.0
    # First pause before re-publishing a task that failed; doubles on each failure.
    pump_retry_delay: float = 1.0
    # Failed attempts (task errors, or losses seen while workers were making progress)
    # after which a target of an entry goes to the dead letters.
    pump_max_attempts: int = 5
    # Demo fault injection: SKUs the demo warehouse refuses with an error, to show dead
    # letters and replay. Empty in production.
    warehouse_reject_skus: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``CELERY_BROKER_URL``, ``WAL_DIR``, ``LEDGER_URL``,
        ``BROKER_VISIBILITY_TIMEOUT``, ``PUMP_*`` and ``WAREHOUSE_REJECT_SKUS``."""
        env = os.environ if env is None else env
        skus = env.get("WAREHOUSE_REJECT_SKUS", "")
        return cls(
            broker_url=env.get("CELERY_BROKER_URL") or DEFAULT_BROKER_URL,
            wal_dir=env.get("WAL_DIR") or DEFAULT_WAL_DIR,
            ledger_url=env.get("LEDGER_URL") or DEFAULT_LEDGER_URL,
            visibility_timeout=_float(env, "BROKER_VISIBILITY_TIMEOUT", 3600.0, 1.0),
            pump_window=_int(env, "PUMP_WINDOW", 10_000, 1),
            pump_ack_timeout=_float(env, "PUMP_ACK_TIMEOUT", 30.0, 0.05),
            pump_max_ack_timeout=_float(env, "PUMP_MAX_ACK_TIMEOUT", 300.0, 0.05),
            pump_retry_delay=_float(env, "PUMP_RETRY_DELAY", 1.0, 0.0),
            pump_max_attempts=_int(env, "PUMP_MAX_ATTEMPTS", 5, 1),
            warehouse_reject_skus=frozenset(s.strip() for s in skus.split(",") if s.strip()),
        )
