"""What one WAL record asks for: the Celery tasks it must become.

The log and the pump know nothing of purchases: an entry names its tasks (target,
task name, queue, arguments) and the pump publishes exactly those. The checkout is the
first user. Encoded as compact JSON (UTF-8), version 1::

    {"v": 1, "key": "<business key, e.g. purchase id>",
     "tasks": [{"target": "warehouse", "name": "tasks.warehouse.reserve_stock",
                "queue": "warehouse", "args": [...], "kwargs": {...}}, ...]}
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import BadRecordError

VERSION = 1
_TARGET = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class TaskSpec:
    target: str  # stable name of the destination; part of the task id and of acks
    name: str  # registered Celery task name
    queue: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Entry:
    key: str
    tasks: tuple[TaskSpec, ...]

    def encode(self) -> bytes:
        doc = {
            "v": VERSION,
            "key": self.key,
            "tasks": [
                {"target": t.target, "name": t.name, "queue": t.queue, "args": t.args,
                 "kwargs": t.kwargs}
                for t in self.tasks
            ],
        }  # fmt: skip
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()

    def only(self, targets: set[str]) -> Entry:
        """The same entry restricted to some targets (dead-letter replay)."""
        return Entry(self.key, tuple(t for t in self.tasks if t.target in targets))


def decode(payload: bytes) -> Entry:
    try:
        doc = json.loads(payload)
        if not isinstance(doc, dict) or doc.get("v") != VERSION:
            raise BadRecordError(f"not a version-{VERSION} entry")
        tasks = tuple(
            TaskSpec(
                target=str(t["target"]),
                name=str(t["name"]),
                queue=str(t["queue"]),
                args=list(t.get("args", [])),
                kwargs=dict(t.get("kwargs", {})),
            )
            for t in doc["tasks"]
        )
        key = str(doc.get("key", ""))
    except (ValueError, KeyError, TypeError) as exc:
        raise BadRecordError(f"undecodable entry: {exc}") from None
    if not tasks:
        raise BadRecordError("entry names no task")
    targets = [t.target for t in tasks]
    if len(set(targets)) != len(targets) or not all(_TARGET.match(t) for t in targets):
        raise BadRecordError(f"entry targets must be unique names: {targets}")
    return Entry(key, tasks)


def task_id(wal_id: str, lsn: int, target: str) -> str:
    """Deterministic: a replay of the same entry has the same id (Flower shows it so)."""
    return f"{wal_id}-{lsn}-{target}"


def parse_task_id(tid: str) -> tuple[str, int, str] | None:
    """(wal_id, lsn, target) from a task id made by ``task_id``, else None."""
    parts = tid.split("-", 2)
    if len(parts) != 3 or len(parts[0]) != 32 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1]), parts[2]
