"""What ``relay.send`` returns once the record is durable."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Receipt:
    # The record's LSN in the WAL; with the WAL id it makes the task ids.
    lsn: int
    # The idempotency key it was sent with (None: none).
    key: str | None
    # The Celery task id of each task, in the order given to send(): what Flower, the
    # workers' acks and the dead letters show (see walrelay.record.task_id).
    task_ids: tuple[str, ...]
