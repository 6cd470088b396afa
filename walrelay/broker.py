"""The seam between the pump and the broker.

The pump talks only to a ``Publisher``: publish a batch of task messages, drain the acks
that workers sent back, and tell whether the broker session is still the same one (a
new session means whatever was queued may be gone). ``walrelay.brokers.kombu`` is the
real one; ``MemoryPublisher`` below is an in-memory stand-in for unit tests, and one
contract suite (tests/test_publisher_contract.py) runs against both.

Nothing here imports Celery or kombu: the ack wire format lives here so the pump and
the workers' signal handlers share it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

ACK_QUEUE_PREFIX = "walstore.acks."
MAX_ERROR_CHARS = 500
# The message header naming the publication a message is (the pump's run and a counter):
# the worker echoes it in its ack, so that an ack counts for the copy it confirms.
COPY_HEADER = "walrelay_copy"
MAX_COPY_CHARS = 64


@dataclass(frozen=True, slots=True)
class TaskMessage:
    """One Celery task to publish: id, registered name, queue and JSON-able arguments,
    with the options its record carries."""

    task_id: str
    name: str
    queue: str
    args: list[Any]
    kwargs: dict[str, Any]
    copy: str = ""  # which publication of the task this is (COPY_HEADER)
    expires: float | None = None  # unix time after which workers discard it
    priority: int | None = None
    headers: dict[str, Any] = field(default_factory=dict)  # the record's own headers
    exchange: str = ""  # "": the default exchange, routed by queue name
    routing_key: str = ""  # "": the queue name


@dataclass(frozen=True, slots=True)
class Ack:
    """A worker's word on one task of one entry: done (``ok``) or failed (``error``).
    ``copy``: the COPY_HEADER of the message it ran (None from workers that predate it)."""

    wal_id: str
    lsn: int
    target: str
    ok: bool
    error: str | None = None
    copy: str | None = None


def ack_queue(wal_id: str) -> str:
    """The queue the pump of WAL ``wal_id`` consumes acks from."""
    return ACK_QUEUE_PREFIX + wal_id


def encode_ack(ack: Ack) -> str:
    doc = {"wal_id": ack.wal_id, "lsn": ack.lsn, "target": ack.target, "ok": ack.ok}
    doc["error"] = None if ack.error is None else ack.error[:MAX_ERROR_CHARS]
    if ack.copy is not None:
        doc["copy"] = ack.copy[:MAX_COPY_CHARS]
    return json.dumps(doc, separators=(",", ":"))


def decode_ack(data: str | bytes | dict[str, Any]) -> Ack | None:
    """The ack in ``data`` (JSON text or an already parsed object), None if malformed."""
    try:
        doc = json.loads(data) if isinstance(data, str | bytes) else data
        lsn, ok, error, copy = doc["lsn"], doc["ok"], doc.get("error"), doc.get("copy")
        if not isinstance(lsn, int) or isinstance(lsn, bool) or not isinstance(ok, bool):
            return None
        return Ack(
            str(doc["wal_id"]),
            lsn,
            str(doc["target"]),
            ok,
            None if error is None else str(error),
            copy if isinstance(copy, str) else None,
        )
    except (ValueError, KeyError, TypeError):
        return None


class Publisher(Protocol):
    """What the pump needs from a broker."""

    def publish(self, messages: Sequence[TaskMessage]) -> None:
        """Publish every message (in order), or raise: BrokerUnavailableError when the
        broker cannot be reached, MessageRejectedError when it (or the encoder) refused
        some of the messages. After an error some of them may have been published."""

    def drain_acks(self, timeout: float, limit: int = 1000) -> list[Ack]:
        """Up to ``limit`` acks for this publisher's WAL; waits at most ``timeout``
        seconds for the first one. Raises BrokerUnavailableError."""

    def session(self) -> str:
        """An opaque token that changes whenever messages queued earlier may have been
        lost: a reconnection, or a broker that restarted (Redis: its run_id). Raises
        BrokerUnavailableError when the broker cannot be reached."""

    def close(self) -> None: ...
