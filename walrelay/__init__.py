"""walrelay: Celery tasks sent durably through a local write-ahead log.

    from walrelay import Relay
    relay = Relay(app)
    receipt = relay.send(reserve_stock.s(order), record_revenue.s(order), key="order-42")

``send`` returns once the record is fsync'd (never touching the broker); ``celery -A
<app> pump`` publishes it until the workers confirm every task.
"""

from .errors import (
    BadRecordError,
    BrokerUnavailableError,
    DeadLetterNotFoundError,
    DuplicateKeyError,
    MessageRejectedError,
    PumpLockedError,
    RelayError,
    UnknownTaskError,
    UnsupportedOptionError,
)
from .relay import Relay
from .settings import RelaySettings

__all__ = [  # noqa: RUF022 (grouped by role, not sorted)
    # sending
    "Relay",
    "RelaySettings",
    # errors
    "BadRecordError",
    "BrokerUnavailableError",
    "DeadLetterNotFoundError",
    "DuplicateKeyError",
    "MessageRejectedError",
    "PumpLockedError",
    "RelayError",
    "UnknownTaskError",
    "UnsupportedOptionError",
]
