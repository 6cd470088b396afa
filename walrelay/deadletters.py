"""Dead letters: entries whose tasks exhausted their attempts, kept durably under the WAL.

One JSON file per dead entry in ``WAL_DIR/deadletters/``, named by the entry's LSN and
written atomically (temp file, fsync, rename, fsync the directory) before the pump lets
the low water mark pass the entry, so a dead letter survives any crash. Not in Redis: a
broker restart would empty it. ``replay`` appends the entry again (restricted to the
targets that failed) as a new record, so the normal pump path delivers it; ``purge``
deletes it.
"""

from __future__ import annotations

import base64
import builtins
import json
import os
from dataclasses import dataclass, field
from typing import Any

from walstore import Wal
from walstore.fs import OsFs

from .errors import BadRecordError, DeadLetterNotFoundError
from .record import decimal, decode

SUBDIR = "deadletters"


@dataclass(frozen=True)
class DeadLetter:
    lsn: int
    wal_id: str
    key: str  # the entry's business key (purchase id), "" if undecodable
    payload: bytes  # the entry to replay: restricted to the failed targets
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)  # target: attempts, error
    reason: str = ""
    dead_at: float = 0.0

    @property
    def id(self) -> str:
        return str(self.lsn)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "id": self.id,
            "lsn": self.lsn,
            "wal_id": self.wal_id,
            "key": self.key,
            "targets": self.targets,
            "reason": self.reason,
            "dead_at": self.dead_at,
        }
        try:
            doc["payload"] = self.payload.decode()
        except UnicodeDecodeError:
            doc["payload_b64"] = base64.b64encode(self.payload).decode()
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> DeadLetter:
        if "payload" in doc:
            payload = str(doc["payload"]).encode()
        else:
            payload = base64.b64decode(doc["payload_b64"])
        return cls(
            lsn=int(doc["lsn"]),
            wal_id=str(doc["wal_id"]),
            key=str(doc.get("key", "")),
            payload=payload,
            targets=dict(doc.get("targets", {})),
            reason=str(doc.get("reason", "")),
            dead_at=float(doc.get("dead_at", 0.0)),
        )


class DeadLetterStore:
    """The dead letters of the WAL in ``wal_dir``, written through walstore's file layer
    (``fs``, default ``OsFs``: tests pass a fault-injecting one)."""

    def __init__(self, wal_dir: str, fs: OsFs | None = None) -> None:
        self.directory = os.path.join(os.path.abspath(wal_dir), SUBDIR)
        self.fs = fs or OsFs()

    def _path(self, letter_id: str) -> str:
        lsn = decimal(letter_id)
        if lsn is None:
            raise DeadLetterNotFoundError(f"{letter_id!r} is not a dead-letter id (an LSN)")
        return os.path.join(self.directory, f"{lsn:020d}.json")

    def add(self, letter: DeadLetter) -> None:
        """Store durably (replacing a dead letter with the same id)."""
        if not os.path.isdir(self.directory):
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            self.fs.fsync_dir(os.path.dirname(self.directory))  # the new directory's entry
        data = json.dumps(letter.to_json(), indent=1, sort_keys=True).encode()
        self.fs.write_file_atomic(self.directory, os.path.basename(self._path(letter.id)), data)

    def list(self) -> list[DeadLetter]:
        """The readable dead letters, oldest entry first (``scan`` names the others)."""
        return self.scan()[0]

    def scan(self) -> tuple[builtins.list[DeadLetter], builtins.list[tuple[str, str]]]:
        """(readable dead letters, [(path, why) of each unreadable file]), oldest first:
        one damaged file must not hide the others."""
        if not os.path.isdir(self.directory):
            return [], []
        names = sorted(n for n in os.listdir(self.directory) if n.endswith(".json"))
        letters: builtins.list[DeadLetter] = []
        unreadable: builtins.list[tuple[str, str]] = []
        for name in names:
            path = os.path.join(self.directory, name)
            try:
                letters.append(self.get(str(int(name.removesuffix(".json")))))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                unreadable.append((path, f"{type(exc).__name__}: {exc}"))
        return letters, unreadable

    def get(self, letter_id: str) -> DeadLetter:
        try:
            with open(self._path(letter_id), "rb") as f:
                return DeadLetter.from_json(json.loads(f.read()))
        except FileNotFoundError:
            raise DeadLetterNotFoundError(f"no dead letter {letter_id}") from None

    def remove(self, letter_id: str) -> None:
        try:
            self.fs.unlink(self._path(letter_id))
        except FileNotFoundError:
            raise DeadLetterNotFoundError(f"no dead letter {letter_id}") from None
        self.fs.fsync_dir(self.directory)

    def replay(self, letter_id: str, wal: Wal) -> int:
        """Append the dead entry again (its failed targets only); returns the new LSN.

        The dead letter is removed after the append is durable: a crash in between
        replays it twice at worst, which the targets' idempotency absorbs."""
        letter = self.get(letter_id)
        try:
            decode(letter.payload)
        except BadRecordError as exc:
            raise ValueError(
                f"dead letter {letter_id} holds an undecodable entry ({exc}); purge it"
            ) from None
        lsn = wal.append(letter.payload)
        self.remove(letter_id)
        return lsn
