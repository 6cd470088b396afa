"""An in-memory broker and publisher for unit tests of the pump's logic (the contract
suite runs it beside the real ones)."""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..broker import Ack, TaskMessage
from ..errors import BrokerUnavailableError, MessageRejectedError


def encoding_error(msg: TaskMessage) -> str | None:
    """Why ``msg`` cannot be sent as UTF-8 JSON (a lone surrogate), as kombu would fail."""
    try:
        json.dumps([msg.args, msg.kwargs, msg.headers], ensure_ascii=False).encode()
        for name in (msg.queue, msg.exchange, msg.routing_key):
            name.encode()  # a destination the broker can be told
    except (UnicodeError, TypeError, ValueError) as exc:
        return f"cannot encode: {exc!r}"
    return None


@dataclass
class MemoryPublisher:
    """In-memory broker and publisher for unit tests: queues are deques of TaskMessage,
    acks a deque. ``restart()`` empties everything and starts a new session, as a Redis
    restart without persistence does; ``down = True`` makes every call fail. After such a
    failure the session is a new one, unless ``keeps_queues`` (a broker that keeps its
    queues over an outage, as RabbitMQ does: then the session stays). ``fail_after = n``
    makes the next publish store its first n messages and then fail (the connection lost
    midway), and the broker down.

    Refusals as the real one meets them: a message that cannot be encoded is refused
    (by position; the others are published), and publishing to a queue in
    ``wrong_type`` (a Redis key that is not a list) publishes the rest of the batch and
    raises without saying which (as a Redis pipeline does)."""

    wal_id: str
    queues: dict[str, deque[TaskMessage]] = field(default_factory=dict)
    acks: deque[Ack] = field(default_factory=deque)
    down: bool = False
    keeps_queues: bool = False
    fail_after: int | None = None
    generation: int = 0
    published: int = 0
    wrong_type: set[str] = field(default_factory=set)
    _lost: bool = False

    def _check(self) -> None:
        if self.down:
            self._lost = not self.keeps_queues  # a real client's next session
            raise BrokerUnavailableError("memory broker is down")

    def publish(self, messages: Sequence[TaskMessage]) -> None:
        self._check()
        if self.fail_after is not None:
            kept, self.fail_after, self.down = messages[: self.fail_after], None, True
            self._store(kept)
            self._check()
        refused: dict[int, str] = {}
        wrong = False
        for i, msg in enumerate(messages):
            error = encoding_error(msg)
            if error is not None:
                refused[i] = error
            elif msg.queue in self.wrong_type:
                wrong = True
            else:
                self.queues.setdefault(msg.queue, deque()).append(msg)
                self.published += 1
        if wrong:
            raise MessageRejectedError("WRONGTYPE Operation against a key holding the wrong "
                                       "kind of value")  # fmt: skip
        if refused:
            raise MessageRejectedError(f"{len(refused)} message(s) refused", refused)

    def _store(self, messages: Sequence[TaskMessage]) -> None:
        for msg in messages:
            self.queues.setdefault(msg.queue, deque()).append(msg)
        self.published += len(messages)

    def drain_acks(self, timeout: float, limit: int = 1000) -> list[Ack]:
        self._check()
        if not self.acks and timeout > 0:
            time.sleep(min(timeout, 0.001))  # never a real wait in unit tests
        out: list[Ack] = []
        while self.acks and len(out) < limit:
            out.append(self.acks.popleft())
        return out

    def session(self) -> str:
        self._check()
        if self._lost:
            self._lost = False
            self.generation += 1
        return f"memory:{self.generation}"

    def close(self) -> None:
        pass

    # ---------------------------------------------------------------- test controls
    def send_ack(self, ack: Ack) -> None:
        """What a worker's task-success/failure handler does."""
        self._check()
        if ack.wal_id == self.wal_id:
            self.acks.append(ack)

    def take(self, queue: str, limit: int = 1_000_000) -> list[TaskMessage]:
        """Messages a worker would fetch from ``queue`` (removes them)."""
        q = self.queues.get(queue, deque())
        out: list[TaskMessage] = []
        while q and len(out) < limit:
            out.append(q.popleft())
        return out

    def restart(self) -> None:
        self.queues.clear()
        self.acks.clear()
        self.generation += 1
