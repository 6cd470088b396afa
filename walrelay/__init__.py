"""walrelay: Celery tasks sent durably through a local write-ahead log.

    from walrelay import Relay
    relay = Relay(app)
    receipt = relay.send(reserve_stock.s(order), record_revenue.s(order), key="order-42")

``send`` returns once the record is fsync'd (never touching the broker); ``celery -A
<app> pump`` publishes it until the workers confirm every task. See docs/api.md.
"""

from typing import TYPE_CHECKING, Any

from walstore import (
    CorruptLogError,
    LogFullError,
    LogPoisonedError,
    RecordTooLargeError,
    WalError,
)

from .errors import (
    BadRecordError,
    BrokerUnavailableError,
    DeadLetterNotFoundError,
    DuplicateKeyError,
    KeyIndexError,
    MessageRejectedError,
    NotSerializableError,
    PumpLockedError,
    RelayError,
    SendError,
    UnknownTaskError,
    UnsupportedOptionError,
)
from .receipt import Receipt
from .relay import Relay
from .settings import RelaySettings

if TYPE_CHECKING:
    from .metrics import FsyncTimingFs, render_web_metrics, web_metrics

__all__ = [  # noqa: RUF022 (grouped by role, not sorted)
    # sending
    "Relay",
    "Receipt",
    "RelaySettings",
    # errors: walrelay's
    "RelayError",
    "SendError",
    "UnsupportedOptionError",
    "UnknownTaskError",
    "NotSerializableError",
    "DuplicateKeyError",
    "KeyIndexError",
    "BadRecordError",
    "BrokerUnavailableError",
    "DeadLetterNotFoundError",
    "MessageRejectedError",
    "PumpLockedError",
    # errors: the log's (walstore's, passed through send unchanged)
    "WalError",
    "LogFullError",
    "LogPoisonedError",
    "RecordTooLargeError",
    "CorruptLogError",
    # metrics of a web process that sends (requests, append and fsync latency, WAL gauges)
    "web_metrics",
    "render_web_metrics",
    "FsyncTimingFs",
]


_LAZY = {"web_metrics", "render_web_metrics", "FsyncTimingFs"}


def __getattr__(name: str) -> Any:
    """The metrics names, imported on first use: prometheus_client reads its environment
    (PROMETHEUS_MULTIPROC_DIR) when it is imported, and importing walrelay reads none."""
    if name in _LAZY:
        from . import metrics

        return getattr(metrics, name)
    raise AttributeError(f"module 'walrelay' has no attribute {name!r}")
