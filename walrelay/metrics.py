"""Prometheus metrics of the web app and of the pump.

Three kinds, read in three ways:

- Web process metrics (requests by status, WAL append latency) are ordinary counters and
  histograms, created on first use. With ``uvicorn --workers N`` every worker is its own
  process: set ``PROMETHEUS_MULTIPROC_DIR`` to an empty directory writable by all of them
  *before the server starts* (prometheus_client picks its storage when it is imported) and
  wipe it when the server restarts (docker-compose mounts a tmpfs there). A scrape of any
  worker then reports the sum over all of them.
- WAL gauges (segments, bytes, LSNs, watermarks, pending) are read from ``Wal.status()``
  at scrape time by ``WalCollector``. The log's state is shared by every process that has
  it open, so any one process reports the right values and no per-process copy exists.
- Pump metrics are read from the pump's own stats object at scrape time by
  ``PumpCollector`` and served by ``start_exporter`` on the pump's own port.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client import values as prom_values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from walstore import Wal
from walstore.fs import OsFs

from .settings import DEFAULT_METRICS_ADDR, MetricsSettings

log = logging.getLogger(__name__)

NAMESPACE = "walpurchase"
# fdatasync costs 0.1-0.2 ms on this machine class and 1-3 ms on laptop SSDs; a stalled
# disk shows up in the top buckets.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
)  # fmt: skip

__all__ = [
    "CONTENT_TYPE_LATEST",
    "FsyncTimingFs",
    "PumpCollector",
    "WalCollector",
    "WebMetrics",
    "exporter_from_env",
    "fsync_histogram",
    "pump_registry",
    "render_web_metrics",
    "start_exporter",
    "web_metrics",
]


# ---------------------------------------------------------------------- web process metrics
@dataclass(frozen=True)
class WebMetrics:
    requests: Counter
    append_seconds: Histogram

    def collectors(self) -> tuple[Collector, ...]:
        return (self.requests, self.append_seconds)


_lock = threading.Lock()
_web: WebMetrics | None = None
_fsync: Histogram | None = None


def web_metrics() -> WebMetrics:
    """This process's web metrics, created on first use (never at import).

    Registered in no registry: a scrape builds its own (see ``render_web_metrics``), so
    several apps in one process (tests) never collide on names."""
    global _web
    with _lock:
        if _web is None:
            check_multiprocess_dir()
            _web = WebMetrics(
                requests=Counter(
                    "http_requests",
                    "HTTP requests answered, by method, route template and status code.",
                    ["method", "route", "status"],
                    namespace=NAMESPACE,
                    registry=None,
                ),
                append_seconds=Histogram(
                    "wal_append_seconds",
                    "Time for one append to become durable (write and group-commit "
                    "fdatasync), as seen by the appending process.",
                    namespace=NAMESPACE,
                    buckets=LATENCY_BUCKETS,
                    registry=None,
                ),
            )
        return _web


def fsync_histogram() -> Histogram:
    """The fdatasync latency histogram, created (and so exported) only once something
    times fsyncs with ``FsyncTimingFs``: an always-empty series would mislead."""
    global _fsync
    with _lock:
        if _fsync is None:
            check_multiprocess_dir()
            _fsync = Histogram(
                "wal_fsync_seconds",
                "Time of each fdatasync of a WAL segment made by this process.",
                namespace=NAMESPACE,
                buckets=LATENCY_BUCKETS,
                registry=None,
            )
        return _fsync


def check_multiprocess_dir() -> None:
    """ValueError naming ``PROMETHEUS_MULTIPROC_DIR`` if prometheus_client keeps values
    there and it is not a writable directory: every metric is a file in it, and its
    failure is a setting to fix, not a failure of whatever the metric times."""
    if not multiprocess_mode():
        return
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path and not (os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)):
        raise ValueError(
            f"PROMETHEUS_MULTIPROC_DIR={path!r} is not a writable directory (create it, "
            "empty, before the server starts)"
        )


def multiprocess_mode() -> bool:
    """True if prometheus_client keeps values in PROMETHEUS_MULTIPROC_DIR files.

    Decided by prometheus_client when it was imported, so ask it rather than the env."""
    return bool(getattr(prom_values.ValueClass, "_multiprocess", False))


def render_web_metrics(wal: Callable[[], Wal] | None) -> bytes:
    """The text exposition for GET /metrics of a web worker."""
    registry = CollectorRegistry(auto_describe=False)
    if multiprocess_mode():
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # all workers, summed
    else:
        for collector in web_metrics().collectors():
            registry.register(collector)
        if _fsync is not None:
            registry.register(_fsync)
    if wal is not None:
        registry.register(WalCollector(wal))
    return generate_latest(registry)


class FsyncTimingFs(OsFs):
    """The real file layer, timing each segment fdatasync into a histogram.

    Pass as ``Options(fs=FsyncTimingFs())`` where the log is opened; the process then
    reports the pure fsync latency apart from the append latency (which includes it)."""

    def __init__(self, histogram: Histogram | None = None) -> None:
        self._histogram = histogram or fsync_histogram()

    def fdatasync(self, fd: int) -> None:
        start = time.perf_counter()
        try:
            super().fdatasync(fd)
        finally:
            self._histogram.observe(time.perf_counter() - start)


# ---------------------------------------------------------------------- WAL gauges
_WAL_GAUGES = (
    ("segments", "wal_segments", "Segment files of the WAL."),
    ("bytes", "wal_bytes", "Bytes in the WAL's segments."),
    ("first_lsn", "wal_first_lsn", "First LSN still on disk."),
    ("next_lsn", "wal_next_lsn", "LSN the next append gets."),
    ("low_water_mark", "wal_low_water_mark", "Every LSN below is confirmed by all targets."),
    ("high_water_mark", "wal_high_water_mark", "Every LSN below is durable."),
    ("pending", "wal_pending_entries", "Entries not yet confirmed (next LSN - LWM)."),
)


class WalCollector(Collector):
    """WAL gauges read from the shared log state at scrape time."""

    def __init__(self, wal: Callable[[], Wal]) -> None:
        self._wal = wal

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(f"{NAMESPACE}_wal_up", "1 if the WAL could be read.")
        try:
            wal = self._wal()
            status = wal.status()
            poisoned = wal.poisoned
        except Exception:  # a scrape must answer even when the log cannot be opened
            log.warning("metrics: cannot read the WAL status", exc_info=True)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        for attr, name, doc in _WAL_GAUGES:
            yield GaugeMetricFamily(f"{NAMESPACE}_{name}", doc, value=getattr(status, attr))
        yield GaugeMetricFamily(
            f"{NAMESPACE}_wal_poisoned",
            "1 if an fsync failed: nothing is acknowledged until every process reopens it.",
            value=int(poisoned),
        )


# ---------------------------------------------------------------------- pump metrics
# (stats attribute, metric name, kind, help), after walrelay.pump.PumpStats. Counters are
# exposed with a _total suffix; booleans as 0/1.
PUMP_FIELDS: tuple[tuple[str, str, str, str], ...] = (
    ("backlog", "pump_backlog_entries", "gauge", "Entries between the low and high water marks."),
    ("oldest_unconfirmed_age", "pump_oldest_unconfirmed_age_seconds", "gauge",
     "Seconds since the oldest unconfirmed entry was first sent (0 when none)."),
    ("in_flight", "pump_in_flight_entries", "gauge", "Entries published and not yet confirmed."),
    ("published", "pump_published", "counter", "Task messages published (sends and re-sends)."),
    ("acked", "pump_acked", "counter", "Task-success acks applied."),
    ("redelivered", "pump_redelivered", "counter",
     "Task messages published again (timeouts, failures, broker restarts)."),
    ("dead_lettered", "pump_dead_lettered", "counter", "Entries moved to the dead letters."),
    ("failed", "pump_failed", "counter", "Task-failure acks applied (failed attempts)."),
    ("lost", "pump_lost", "counter", "Suspected losses counted as failed attempts."),
    ("duplicate_acks", "pump_duplicate_acks", "counter", "Acks for targets already done."),
    ("stale_acks", "pump_stale_acks", "counter",
     "Acks of records lost with the end of the log (walstore repair), whose LSNs new "
     "records took: ignored."),
    ("entries_done", "pump_entries_done", "counter", "Entries confirmed or dead-lettered."),
    ("pruned_segments", "pump_pruned_segments", "counter", "WAL segments deleted below the LWM."),
    ("broker_sessions", "pump_broker_sessions", "counter",
     "Broker sessions seen: 1, plus one for each time the broker was found to have lost "
     "what was queued (the pump then re-sent its window)."),
    ("probes", "pump_probes", "counter",
     "Re-sends of the oldest task of a queue that stopped moving."),
    ("stalled", "pump_stalled", "counter",
     "Tasks dead-lettered because their queue never moved (PUMP_STALL_TIMEOUT)."),
    ("rejected", "pump_rejected", "counter",
     "Task messages the broker or the encoder refused (dead-lettered, not retried)."),
    ("expired", "pump_expired", "counter", "Tasks past their expiry, confirmed unsent."),
    ("carried", "pump_carried", "counter",
     "Held records appended again to unpin old segments (PUMP_CARRY_AFTER)."),
    ("read_errors", "pump_read_errors", "counter", "Failed reads of the log (retried)."),
    ("parked", "pump_parked_entries", "gauge", "Records held for their eta or order key."),
    ("broker_down", "pump_broker_down", "gauge", "1 while the broker cannot be reached."),
    ("low_water_mark", "pump_low_water_mark", "gauge", "The pump's low water mark."),
    ("high_water_mark", "pump_high_water_mark", "gauge", "The high water mark the pump saw."),
    ("read_lsn", "pump_read_lsn", "gauge", "Next LSN the pump reads."),
)  # fmt: skip


def _field(stats: object, name: str) -> Any:
    if isinstance(stats, Mapping):
        return stats.get(name)
    return getattr(stats, name, None)


class PumpCollector(Collector):
    """Pump metrics from a stats object (dataclass, object or mapping) read at scrape time.

    ``stats`` returns the current stats; a field it lacks, or holds as None, is left out,
    so the pump can grow its stats without breaking the exporter. It runs in the
    exporter's thread: give it plain reads (``lambda: pump.stats``, refreshed by the
    pump's own loop), not something that walks structures the pump is changing."""

    def __init__(self, stats: Callable[[], object]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(f"{NAMESPACE}_pump_up", "1 if the pump's stats could be read.")
        try:
            stats = self._stats()
        except Exception:  # a scrape must answer even while the pump is in trouble
            log.warning("metrics: cannot read the pump stats", exc_info=True)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        for attr, name, kind, doc in PUMP_FIELDS:
            value = _field(stats, attr)
            if value is None:
                continue
            full = f"{NAMESPACE}_{name}"
            if kind == "counter":
                yield CounterMetricFamily(full, doc, value=float(value))
            else:
                yield GaugeMetricFamily(full, doc, value=float(value))


def pump_registry(
    stats: Callable[[], object], wal: Callable[[], Wal] | None = None
) -> CollectorRegistry:
    """A registry with the pump's metrics and, given the pump's log, the WAL gauges."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PumpCollector(stats))
    if wal is not None:
        registry.register(WalCollector(wal))
    return registry


# ---------------------------------------------------------------------- HTTP exporter
@dataclass
class Exporter:
    """A running metrics HTTP server; ``close`` stops it and frees the port."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_exporter(
    registry: CollectorRegistry, port: int, addr: str = DEFAULT_METRICS_ADDR
) -> Exporter:
    """Serve ``registry`` at http://addr:port/metrics from a daemon thread (port 0: any)."""
    server, thread = start_http_server(port, addr=addr, registry=registry)
    return Exporter(server, thread)


def exporter_from_env(
    registry: CollectorRegistry, env: Mapping[str, str] | None = None
) -> Exporter | None:
    """Start the exporter if ``PUMP_METRICS_PORT`` is set (on ``PUMP_METRICS_ADDR``,
    default 127.0.0.1): see ``MetricsSettings``."""
    settings = MetricsSettings.from_env(env)
    if settings.port is None:
        return None
    return start_exporter(registry, settings.port, settings.addr)
