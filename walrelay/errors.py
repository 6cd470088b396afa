"""Every error walrelay raises, in one tree under ``RelayError``.

walstore's errors (``LogFullError``, ``LogPoisonedError``, ...) pass through ``send``
unchanged: they say what happened to the log, and a web app maps them to 503."""

from __future__ import annotations


class RelayError(Exception):
    """Base of every walrelay error."""


class SendError(RelayError, ValueError):
    """``send`` refused what it was given (no task, a key that is not a short string, ...).
    Nothing was appended. The base of the errors below that say more."""


class UnsupportedOptionError(SendError):
    """``send`` was given something it cannot carry durably (``link``, ``link_error``, a
    chain, a chord, a group, a caller-given ``task_id``, ...). Nothing was appended.
    Send the tasks separately, or chain them inside a task."""


class UnknownTaskError(SendError):
    """``send`` was given a task the app does not register. Nothing was appended.
    Import the module that defines it (``include=`` or ``autodiscover_tasks``)."""


class NotSerializableError(SendError):
    """A task's args, kwargs or headers cannot be stored as JSON text: a type JSON does not
    have (datetime, bytes, a set, an object), NaN or infinity, or a string with a lone
    UTF-16 surrogate. Nothing was appended. Send plain JSON values (ISO strings for dates)."""


class DuplicateKeyError(RelayError):
    """``send(..., key=K)`` with tasks other than those of the first send with key K
    within the idempotency window. Nothing was appended. Use a new key for new work."""


class KeyIndexError(RelayError):
    """The idempotency index (``keys.sqlite3`` in WAL_DIR) cannot be used: damaged, or
    unreadable. Keyed sends fail with it (sends without a key do not use the index); the
    message says whether the send may have been appended and how to repair the index."""


class BadRecordError(RelayError, ValueError):
    """A log record's bytes are not a record this release can replay; the pump
    dead-letters such records with this error's message as the reason."""


class BrokerUnavailableError(RelayError):
    """The broker cannot be reached, or a publish failed midway. The pump retries later
    and re-sends what may have been lost once a session is established again."""


class MessageRejectedError(RelayError):
    """The broker refused a message it was able to take others of (Redis: WRONGTYPE,
    an ACL), or a message could not be encoded (a lone surrogate). ``rejected`` maps the
    positions of the refused messages in the batch to the reason, when known (empty:
    some message of the batch, which one unknown; the others may have been published).
    The pump publishes such a batch one message at a time and dead-letters a message
    still refused alone after PUMP_MAX_ATTEMPTS: it is not a broker outage."""

    def __init__(self, message: str, rejected: dict[int, str] | None = None) -> None:
        super().__init__(message)
        self.rejected = dict(rejected or {})


class PumpLockedError(RelayError):
    """Another pump holds this WAL's pump lock: run exactly one pump per WAL_DIR."""


class DeadLetterNotFoundError(RelayError, KeyError):
    """No dead letter has that id (``celery deadletters list`` shows them)."""

    def __str__(self) -> str:  # KeyError's would quote the message
        return str(self.args[0]) if self.args else ""
