"""Lanes: the first-in first-out stretches of the broker (one queue at one priority), and
what the pump knows of how far the workers got along each.

Every publication gets the next number of a counter (its copy). When the workers confirm
a copy, every copy published before it on the same lane has been taken from the queue:
a task whose latest copy is that far behind and still unconfirmed was lost (or is still
running: the pump gives it one more ack timeout). An ack counts for the copy it names,
never for the newest copy of its task, so a backlog that drains slowly never makes the
tasks queued behind it look lost. A lane with tasks waiting and no ack at all is not
moving: the workers are down, or none consumes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LaneKey = tuple[str, int]  # (queue, priority)
Slot = tuple[int, str]  # (identity, target) of a task waiting on the lane


@dataclass(slots=True)
class Lane:
    progress: int = 0  # highest copy number known taken from the queue
    moved_at: float = 0.0  # last ack (success or failure) of a task of this lane
    probed_at: float = float("-inf")  # last re-send of a task to see if the lane moves
    # Tasks published and unconfirmed, the one whose latest copy is oldest first.
    waiting: dict[Slot, None] = field(default_factory=dict)


class Lanes:
    def __init__(self) -> None:
        self.lanes: dict[LaneKey, Lane] = {}

    def get(self, key: LaneKey, now: float) -> Lane:
        lane = self.lanes.get(key)
        if lane is None:
            lane = self.lanes[key] = Lane(moved_at=now)
        return lane

    def sent(self, key: LaneKey, slot: Slot, now: float) -> None:
        """A new copy of ``slot`` went to the end of the queue."""
        waiting = self.get(key, now).waiting
        waiting.pop(slot, None)
        waiting[slot] = None

    def forget(self, key: LaneKey, slot: Slot) -> None:
        lane = self.lanes.get(key)
        if lane is not None:
            lane.waiting.pop(slot, None)

    def confirmed(self, key: LaneKey, copy: int | None, now: float) -> None:
        """The workers finished (or failed) a task of this lane: copy ``copy`` if known."""
        lane = self.get(key, now)
        lane.moved_at = now
        if copy is not None and copy > lane.progress:
            lane.progress = copy

    def head(self, key: LaneKey) -> Slot | None:
        lane = self.lanes.get(key)
        return next(iter(lane.waiting), None) if lane is not None else None

    def restart_clocks(self, now: float) -> None:
        """After a broker outage: the time it was down is no evidence against a queue."""
        for lane in self.lanes.values():
            lane.moved_at = max(lane.moved_at, now)
