"""Records the pump has read but may not publish yet: held until their eta (a countdown:
never a broker ETA, kombu#337), or waiting behind an earlier record of their order key.

They are kept as bytes (a parked record costs its payload, not a decoded entry) and stay
in the log until confirmed, so a restarted pump finds and parks them again: the wait is
durable. Order chains list the records of each order key in LSN order; only the head
may be in the window.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(slots=True)
class Parked:
    lsn: int  # where the record is in the log
    identity: int  # the LSN its task ids are made of
    payload: bytes
    order_key: str | None
    due: float  # clock time of its earliest eta (0: not held, only behind its order key)
    parked_at: float


class Parking:
    def __init__(self) -> None:
        self.parked: dict[int, Parked] = {}  # by identity
        self._heap: list[tuple[float, int, int]] = []  # (due, identity, lsn)
        self._chains: dict[str, deque[int]] = {}  # order key -> identities, LSN order
        self._carry: deque[tuple[int, int]] = deque()  # (identity, lsn) of held records

    def __len__(self) -> int:
        return len(self.parked)

    def park(self, p: Parked, *, carriable: bool) -> None:
        self.parked[p.identity] = p
        if not p.order_key or self.is_head(p.order_key, p.identity):
            heapq.heappush(self._heap, (p.due, p.identity, p.lsn))
        if carriable:
            self._carry.append((p.identity, p.lsn))

    def remove(self, identity: int) -> Parked | None:
        return self.parked.pop(identity, None)

    # ---------------------------------------------------------------- order keys
    def join(self, order_key: str, identity: int) -> bool:
        """Add a record to its key's chain; True if it is the head (may be published)."""
        chain = self._chains.setdefault(order_key, deque())
        chain.append(identity)
        return chain[0] == identity

    def is_head(self, order_key: str, identity: int) -> bool:
        chain = self._chains.get(order_key)
        return chain is not None and chain[0] == identity  # (empty chains are deleted)

    def leave(self, order_key: str, identity: int) -> None:
        """The record is done: the next of its key (if parked) may go once due."""
        chain = self._chains.get(order_key)
        if not chain:
            return
        if chain[0] == identity:
            chain.popleft()
        else:
            chain.remove(identity)
        if not chain:
            del self._chains[order_key]
            return
        nxt = self.parked.get(chain[0])
        if nxt is not None:
            heapq.heappush(self._heap, (nxt.due, nxt.identity, nxt.lsn))

    # ---------------------------------------------------------------- leaving
    def ready(self, now: float, limit: int) -> list[Parked]:
        """Up to ``limit`` records now free to go (removed from the parking)."""
        out: list[Parked] = []
        heap = self._heap
        while heap and heap[0][0] <= now and len(out) < limit:
            _due, identity, lsn = heapq.heappop(heap)
            p = self.parked.get(identity)
            if p is None or p.lsn != lsn:
                continue  # gone or replaced since
            if p.order_key and not self.is_head(p.order_key, identity):
                continue  # pushed again when it becomes the head
            del self.parked[identity]
            out.append(p)
        return out

    def carriable(self, now: float, after: float, limit: int) -> Iterator[Parked]:
        """Held records parked ``after`` seconds or more and due later than ``after``
        seconds from now (sooner, they will leave soon enough), oldest first."""
        carry = self._carry
        while carry:
            identity, lsn = carry[0]
            p = self.parked.get(identity)
            if p is None or p.lsn != lsn:
                carry.popleft()
                continue
            break
        for identity, lsn in itertools.islice(carry, limit):
            p = self.parked.get(identity)
            if p is None or p.lsn != lsn:
                continue
            if p.parked_at + after > now:
                return
            if p.due - now > after:
                yield p
