"""The relay's settings: one frozen dataclass, read from the environment only by
``RelaySettings.from_env`` (called when a ``Relay`` is first used and by the commands,
never at import); and the pump's metrics exporter's, read by ``celery pump`` alone
(``MetricsSettings.from_env``). The log's own settings (``WAL_SEGMENT_BYTES``,
``WAL_MAX_BYTES``, ``WAL_SYNC``) are walstore's: ``walstore.Options.from_env``."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_WAL_DIR = "./var/wal"
DEFAULT_PUMP_WINDOW = 10_000
DEFAULT_ACK_TIMEOUT = 30.0
DEFAULT_MAX_ACK_TIMEOUT = 300.0
DEFAULT_RETRY_DELAY = 1.0
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_STALL_TIMEOUT = 7200.0
DEFAULT_CARRY_AFTER = 3600.0
DEFAULT_IDEMPOTENCY_WINDOW = 24 * 3600.0
DEFAULT_METRICS_ADDR = "127.0.0.1"


def env_float(env: Mapping[str, str], name: str, default: float, minimum: float) -> float:
    """``env[name]`` as a float >= ``minimum`` (``default`` if unset or blank)."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{name}={raw!r} must be a finite number")
    if value < minimum:
        raise ValueError(f"{name}={raw!r} must be at least {minimum}")
    return value


def env_int(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    """``env[name]`` as an int >= ``minimum`` (``default`` if unset or blank)."""
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
class RelaySettings:
    # The write-ahead log the producers append to and the pump reads (WAL_DIR).
    wal_dir: str = DEFAULT_WAL_DIR
    # Most WAL records the pump keeps unconfirmed at once: bounds its memory and the
    # number of duplicates a broker restart can cause (PUMP_WINDOW).
    pump_window: int = DEFAULT_PUMP_WINDOW
    # Seconds a task may stay unconfirmed once the workers confirmed a task published
    # after it on its queue; then it was lost: re-sent, a failed attempt (PUMP_ACK_TIMEOUT).
    pump_ack_timeout: float = DEFAULT_ACK_TIMEOUT
    # A queue with tasks waiting and no ack at all for this long gets its oldest task
    # published again (one per period, not counted as a failure): covers a silent loss
    # on an idle queue (PUMP_MAX_ACK_TIMEOUT).
    pump_max_ack_timeout: float = DEFAULT_MAX_ACK_TIMEOUT
    # First pause before re-publishing a task that failed; doubles on each failure
    # (PUMP_RETRY_DELAY).
    pump_retry_delay: float = DEFAULT_RETRY_DELAY
    # Failed attempts after which a task of a record goes to the dead letters
    # (PUMP_MAX_ATTEMPTS).
    pump_max_attempts: int = DEFAULT_MAX_ATTEMPTS
    # A task whose queue has not moved at all (no task of it confirmed or failed) for
    # this many seconds while it waited goes to the dead letters: a queue no worker
    # consumes. Make it longer than the worker outages to ride out (PUMP_STALL_TIMEOUT).
    pump_stall_timeout: float = DEFAULT_STALL_TIMEOUT
    # A record held for its countdown/eta longer than this is appended again under the
    # same task ids, so that it does not pin old segments of the log (PUMP_CARRY_AFTER).
    pump_carry_after: float = DEFAULT_CARRY_AFTER
    # The only queues the pump publishes to, comma-separated; empty: the app's
    # ``task_queues`` when set, else any queue that is not the broker's own
    # (PUMP_QUEUES). A record naming another queue is dead-lettered.
    pump_queues: tuple[str, ...] = ()
    # How long ``relay.send(..., key=K)`` remembers K: a second send with the same key
    # within this many seconds returns the first receipt (RELAY_IDEMPOTENCY_WINDOW).
    idempotency_window: float = DEFAULT_IDEMPOTENCY_WINDOW

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RelaySettings:
        """Settings from ``WAL_DIR``, ``PUMP_*`` and ``RELAY_IDEMPOTENCY_WINDOW``."""
        env = os.environ if env is None else env
        return cls(
            wal_dir=env.get("WAL_DIR") or DEFAULT_WAL_DIR,
            pump_window=env_int(env, "PUMP_WINDOW", DEFAULT_PUMP_WINDOW, 1),
            pump_ack_timeout=env_float(env, "PUMP_ACK_TIMEOUT", DEFAULT_ACK_TIMEOUT, 0.05),
            pump_max_ack_timeout=env_float(
                env, "PUMP_MAX_ACK_TIMEOUT", DEFAULT_MAX_ACK_TIMEOUT, 0.05
            ),
            pump_retry_delay=env_float(env, "PUMP_RETRY_DELAY", DEFAULT_RETRY_DELAY, 0.0),
            pump_max_attempts=env_int(env, "PUMP_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS, 1),
            pump_stall_timeout=env_float(env, "PUMP_STALL_TIMEOUT", DEFAULT_STALL_TIMEOUT, 1.0),
            pump_carry_after=env_float(env, "PUMP_CARRY_AFTER", DEFAULT_CARRY_AFTER, 1.0),
            pump_queues=tuple(
                q.strip() for q in env.get("PUMP_QUEUES", "").split(",") if q.strip()
            ),
            idempotency_window=env_float(
                env, "RELAY_IDEMPOTENCY_WINDOW", DEFAULT_IDEMPOTENCY_WINDOW, 0.0
            ),
        )


@dataclass(frozen=True)
class MetricsSettings:
    """Where the pump serves its Prometheus metrics. Apart from ``RelaySettings`` because
    only the pump reads them: a bad value stops the pump with a clear message, not every
    process that imports the app (workers, web, Flower)."""

    # TCP port (0: any free one); None: no exporter (PUMP_METRICS_PORT).
    port: int | None = None
    # Address to listen on; a container sets 0.0.0.0 so Prometheus can reach it
    # (PUMP_METRICS_ADDR).
    addr: str = DEFAULT_METRICS_ADDR

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> MetricsSettings:
        """Settings from ``PUMP_METRICS_PORT`` and ``PUMP_METRICS_ADDR``."""
        env = os.environ if env is None else env
        raw = env.get("PUMP_METRICS_PORT", "").strip()
        port: int | None = None
        if raw:
            try:
                port = int(raw)
            except ValueError:
                port = -1
            if not 0 <= port <= 65535:
                raise ValueError(f"PUMP_METRICS_PORT={raw!r} is not a TCP port (0-65535)")
        return cls(port, env.get("PUMP_METRICS_ADDR", "").strip() or DEFAULT_METRICS_ADDR)
