"""What one WAL record asks for: the Celery tasks it must become.

The log knows nothing of Celery; a record names its tasks (target, task name, queue,
arguments, options) and the pump publishes exactly those. Encoded as compact JSON
(UTF-8). Version 2, written by ``Relay.send``::

    {"v": 2, "key": "<idempotency key>" | null, "order_key": "<key>" | null,
     "origin": <LSN the record was first written at> | null, "created": <unix time>,
     "tasks": [{"target": "0", "name": "shop.tasks.reserve_stock", "queue": "stock",
                "args": [...], "kwargs": {...},
                "options": {"eta": <unix time>, "expires": <unix time>, "priority": 5,
                            "headers": {...}, "exchange": "", "routing_key": "stock"}},
               ...]}

- ``target``: names the task within its record ("0", "1", ... for ``send``); with the
  WAL id and the LSN it makes the task id (``task_id``), so a replay has the same id.
- ``origin``: set when the pump carries a waiting record (a long countdown) forward to
  a new LSN, so that its task ids, acks and dead letters keep the first LSN's identity.
- ``options``: every key optional. ``eta``/``expires`` are absolute unix times (a
  countdown is turned into an eta when sent); the pump holds a task until its eta and
  publishes it without a broker ETA. ``exchange``/``routing_key`` come from the app's
  router ("" and the queue name: the default exchange).

Version 1 (the first release; still replayed): ``{"v": 1, "key": ..., "tasks": [{
"target", "name", "queue", "args", "kwargs"}]}``, no options, no order key.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import BadRecordError

VERSION = 2
VERSIONS = (1, 2)
_TARGET = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# Built once: json.dumps with arguments builds an encoder per call (the same text).
_UTF8 = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_ESCAPED = json.JSONEncoder(separators=(",", ":"))
OPTION_KEYS = frozenset({"eta", "expires", "priority", "headers", "exchange", "routing_key"})


@dataclass(frozen=True)
class TaskSpec:
    target: str  # stable name of the task within its record; part of the task id and acks
    name: str  # registered Celery task name
    queue: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # see OPTION_KEYS

    @property
    def eta(self) -> float | None:
        eta = self.options.get("eta")
        return None if eta is None else float(eta)


@dataclass(frozen=True)
class Entry:
    key: str | None
    tasks: tuple[TaskSpec, ...]
    order_key: str | None = None
    origin: int | None = None  # first LSN of a record carried forward
    created: float | None = None  # unix time of the send
    version: int = VERSION

    def encode(self) -> bytes:
        """Version-2 JSON (whatever version it was decoded from)."""
        doc: dict[str, Any] = {
            "v": VERSION,
            "key": self.key,
            "order_key": self.order_key,
            "origin": self.origin,
            "created": self.created,
            "tasks": [_task_doc(t) for t in self.tasks],
        }
        try:
            return _UTF8.encode(doc).encode()
        except UnicodeEncodeError:  # a lone surrogate (valid JSON "\ud800"): keep it escaped
            return _ESCAPED.encode(doc).encode()

    def only(self, targets: set[str]) -> Entry:
        """The same entry restricted to some targets (dead-letter replay)."""
        kept = tuple(t for t in self.tasks if t.target in targets)
        return Entry(self.key, kept, self.order_key, self.origin, self.created, self.version)

    def identity(self, lsn: int) -> int:
        """The LSN its task ids are made of: ``origin`` if carried forward, else ``lsn``."""
        return lsn if self.origin is None else self.origin


def _task_doc(t: TaskSpec) -> dict[str, Any]:
    doc: dict[str, Any] = {"target": t.target, "name": t.name, "queue": t.queue,
                           "args": t.args, "kwargs": t.kwargs}  # fmt: skip
    if t.options:
        doc["options"] = t.options
    return doc


def _task(t: Any) -> TaskSpec:
    options = t.get("options") or {}
    if not isinstance(options, dict) or not set(options) <= OPTION_KEYS:
        raise BadRecordError(f"bad task options: {options!r}")
    return TaskSpec(
        target=str(t["target"]),
        name=str(t["name"]),
        queue=str(t["queue"]),
        args=list(t.get("args", [])),
        kwargs=dict(t.get("kwargs", {})),
        options=dict(options),
    )


def _optional_str(doc: dict[str, Any], name: str) -> str | None:
    value = doc.get(name)
    return None if value is None else str(value)


def decode(payload: bytes) -> Entry:
    """The entry in ``payload`` (version 1 or 2), or BadRecordError saying why not.
    Never raises anything else, whatever the bytes (deep nesting included)."""
    try:
        doc = json.loads(payload)
        if not isinstance(doc, dict) or doc.get("v") not in VERSIONS:
            raise BadRecordError(f"not a record of version {' or '.join(map(str, VERSIONS))}")
        tasks = tuple(_task(t) for t in doc["tasks"])
        version = int(doc["v"])
        key = str(doc.get("key", "")) if version == 1 else _optional_str(doc, "key")
        origin = doc.get("origin")
        if origin is not None and (not isinstance(origin, int) or isinstance(origin, bool)):
            raise BadRecordError(f"bad origin: {origin!r}")
        created = doc.get("created")
        created = None if created is None else float(created)
        entry = Entry(key, tasks, _optional_str(doc, "order_key"), origin, created, version)
    except BadRecordError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError,
            OverflowError) as exc:  # fmt: skip
        raise BadRecordError(f"undecodable record: {type(exc).__name__}: {exc}") from None
    if not tasks:
        raise BadRecordError("record names no task")
    targets = [t.target for t in tasks]
    if len(set(targets)) != len(targets) or not all(_TARGET.match(t) for t in targets):
        raise BadRecordError(f"record targets must be unique names: {targets}")
    return entry


def task_id(wal_id: str, lsn: int, target: str) -> str:
    """Deterministic: a replay of the same entry has the same id (Flower shows it so)."""
    return f"{wal_id}-{lsn}-{target}"


def parse_task_id(tid: str) -> tuple[str, int, str] | None:
    """(wal_id, lsn, target) from a task id made by ``task_id``, else None."""
    parts = tid.split("-", 2)
    lsn = decimal(parts[1]) if len(parts) == 3 and len(parts[0]) == 32 else None
    return None if lsn is None else (parts[0], lsn, parts[2])


def decimal(text: str, max_digits: int = 20) -> int | None:
    """``text`` as written by ``str(int)`` for a count or an LSN, else None. Not
    ``str.isdigit`` alone: it holds for "²", which ``int`` refuses, and for Arabic-Indic
    "70" (U+0667 U+0660), which ``int`` reads as 70."""
    if text.isascii() and text.isdigit() and len(text) <= max_digits:
        return int(text)
    return None
