"""What a run promised against what the targets did: the numbers of the chaos report and
of the demo's summary, and the recovery times after faults.

``audit`` compares the purchases the producers were told were committed (acknowledged)
with the ledger: an acknowledged purchase missing from a target is lost; an effect
recorded twice for one (target, purchase) is a double effect (counted with a GROUP BY,
independently of the ledger's primary key); an effect of a purchase nobody attempted is a
phantom. Repeated deliveries that changed nothing are the duplicates absorbed.

``WalMonitor`` samples the log's watermarks in a thread; ``recovery`` is then the time from
a fault's end (the broker back, a process restarted) until the low water mark passed
everything that was durable at that moment: the backlog the fault left is confirmed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import func, select

from tasks.ledger import Ledger, effects
from walstore import WalError
from walstore.inspect import Snapshot

TARGETS = ("warehouse", "finance")


@dataclass
class Audit:
    attempted: int  # purchases the producers set out to record
    acknowledged: int  # of which record_purchase returned (the caller was told: committed)
    effects: dict[str, int]  # per target: purchases with an effect
    deliveries: dict[str, int]  # per target: task deliveries, repeats included
    duplicates: dict[str, int]  # per target: repeated deliveries absorbed (no effect)
    lost: list[str]  # acknowledged but missing from at least one target
    double_effects: int  # (target, purchase) pairs with more than one effect
    phantoms: list[str]  # effects of purchases nobody attempted
    unacknowledged_delivered: int  # producer killed before its answer; committed anyway

    @property
    def ok(self) -> bool:
        return not self.lost and not self.double_effects and not self.phantoms

    def as_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["lost"], doc["lost_ids"] = len(self.lost), self.lost[:20]
        doc["phantoms"], doc["phantom_ids"] = len(self.phantoms), self.phantoms[:20]
        doc["duplicates_absorbed"] = sum(self.duplicates.values())
        return doc


def audit(
    attempted: Iterable[str], acknowledged: Iterable[str], ledger_url: str, prefix: str = ""
) -> Audit:
    """Compare with the ledger at ``ledger_url``, counting only purchase ids that start
    with ``prefix`` (a ledger shared with earlier runs)."""
    tried, acked = set(attempted), set(acknowledged)
    book = Ledger(ledger_url)
    try:
        snap = book.snapshot(TARGETS)
        pair = (effects.c.target, effects.c.purchase_id)
        doubled = select(*pair).group_by(*pair).having(func.count() > 1)
        with book.engine.connect() as conn:
            doubles = [row for row in conn.execute(doubled) if str(row[1]).startswith(prefix)]
    finally:
        book.close()
    mine = {t: {p: n for p, n in rows.items() if p.startswith(prefix)} for t, rows in snap.items()}
    seen = {p for rows in mine.values() for p in rows}
    everywhere = set.intersection(*(set(mine[t]) for t in TARGETS))
    return Audit(
        attempted=len(tried | acked),
        acknowledged=len(acked),
        effects={t: len(mine[t]) for t in TARGETS},
        deliveries={t: sum(mine[t].values()) for t in TARGETS},
        duplicates={t: sum(n - 1 for n in mine[t].values()) for t in TARGETS},
        lost=sorted(acked - everywhere),
        double_effects=len(doubles),
        phantoms=sorted(seen - tried - acked),
        unacknowledged_delivered=len((seen - acked) & tried),
    )


@dataclass(frozen=True)
class Sample:
    at: float  # time.monotonic()
    low_water_mark: int
    high_water_mark: int
    next_lsn: int


@dataclass
class WalMonitor:
    """Samples ``read()`` (the log's status) every ``interval`` seconds in a thread."""

    read: Callable[[], Snapshot]
    interval: float = 0.2
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="wal-monitor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> Sample | None:
        try:
            snap = self.read()
        except (WalError, OSError):  # mid-roll or mid-prune: the next sample will do
            return None
        s = Sample(time.monotonic(), snap.low_water_mark, snap.high_water_mark, snap.next_lsn)
        self.samples.append(s)
        return s

    def stop(self) -> None:
        """Stop sampling, after one last sample: what the caller waited for (a drained
        log, say) may have happened since the previous one, up to ``interval`` ago."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.sample()

    def recovery(self, since: float, target_lsn: int) -> float | None:
        """Seconds from ``since`` until the low water mark reached ``target_lsn``; None
        if it never did while sampled."""
        for s in list(self.samples):
            if s.at >= since and s.low_water_mark >= target_lsn:
                return s.at - since
        return None
