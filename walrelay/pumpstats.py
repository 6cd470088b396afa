"""The pump's counters and gauges (exported to Prometheus by walrelay.metrics), and its
progress line."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass


@dataclass
class PumpStats:
    """Counters of one pump's life (exported to Prometheus by walrelay.metrics)."""

    published: int = 0  # task messages published, first sends and re-sends
    redelivered: int = 0  # of which re-sends (timeouts, failures, broker restarts)
    acked: int = 0  # task-success acks applied
    failed: int = 0  # task-failure acks applied (each a failed attempt)
    lost: int = 0  # proven losses counted as failed attempts
    probes: int = 0  # re-sends of the oldest task of a queue that stopped moving
    stalled: int = 0  # tasks dead-lettered because their queue never moved
    rejected: int = 0  # messages the broker (or the encoder) refused
    expired: int = 0  # tasks confirmed by the pump itself: past their expiry
    carried: int = 0  # held records appended again to unpin old segments
    read_errors: int = 0  # failed reads of the log (retried; nothing skipped)
    duplicate_acks: int = 0  # acks for targets already done (duplicate deliveries)
    stale_acks: int = 0  # acks of records lost with the end of the log (ignored)
    entries_done: int = 0  # entries that left the window (confirmed or dead)
    dead_lettered: int = 0  # entries written to the dead letters
    broker_sessions: int = 0  # broker sessions seen (restarts and reconnections + 1)
    broker_down: bool = False
    pruned_segments: int = 0
    in_flight: int = 0  # entries in the window
    parked: int = 0  # records held for their eta or their order key
    backlog: int = 0  # high water mark minus low water mark
    oldest_unconfirmed_age: float = 0.0  # seconds since the oldest in-flight entry was sent
    low_water_mark: int = 0
    high_water_mark: int = 0
    read_lsn: int = 0  # next LSN the pump reads

    def as_dict(self) -> dict[str, float | int | bool]:
        return asdict(self)


def log_progress(
    logger: logging.Logger, st: PumpStats, now: float, last: tuple[float, int, int]
) -> tuple[float, int, int]:
    """One progress line (rates since ``last``) unless nothing moved; the new ``last``."""
    then, published, acked = last
    if st.published == published and st.acked == acked and not st.backlog:
        return last
    elapsed = max(now - then, 1e-9)
    logger.info(
        "pump: published %.0f/s acked %.0f/s redelivered %d dead %d in-flight %d held %d "
        "backlog %d lwm %d hwm %d oldest %.1fs",
        (st.published - published) / elapsed, (st.acked - acked) / elapsed,
        st.redelivered, st.dead_lettered, st.in_flight, st.parked, st.backlog,
        st.low_water_mark, st.high_water_mark, st.oldest_unconfirmed_age,
    )  # fmt: skip
    return (now, st.published, st.acked)
