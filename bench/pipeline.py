"""Pipeline benchmark: the log and the pump against plain ``.delay()``, same run, same broker.

    python -m bench.pipeline [--broker redis|rabbitmq|sentinel] [--cases relay,e2e,latency]
                             [--relay 4000] [--e2e 1000] [--rates 50%,80%] [--seconds 10]
                             [--rounds 3] [--json out.json]

Everything runs against a private broker on free loopback ports (``tools.brokers``: a
redis-server without persistence, a RabbitMQ node, a Redis Sentinel set) and a private
ledger (SQLite, WAL mode, synchronous=FULL), in a temporary directory. The app's own
settings apply: publisher confirms on RabbitMQ (``confirm_publish``).
- relay (workers stopped): purchases/s published. Baseline: a loop calling ``.delay()``
  for the warehouse and the finance task of each purchase. Pipeline: the pump (same code
  as ``celery -A worker pump``, in this process so that start-up is not timed) relaying a
  log pre-filled with the same number of purchases. Both with task-sent events off (the
  baseline's fastest setting), then both with them on (what Flower needs). Medians of
  ``--rounds`` rounds.
- end to end (2 worker processes, ``-c 1`` each): purchases/s from the first call until
  both effects of every purchase are in the ledger. Baseline: ``.delay()``; pipeline:
  ``record_purchase`` (fsync'd appends) with ``celery -A worker pump`` running (it runs,
  idle, during the baseline too). Rounds interleaved, medians.
- latency: ``record_purchase`` at a steady rate for ``--seconds``, and ``.delay()`` at the
  same rate, alternating, ``--rounds`` times; for each purchase, the time from the call to
  the later of its two effects being committed (the ledger's ``first_at``). Rates are
  fractions of the end-to-end capacity measured in the same run (``50%`` of the
  ``.delay()`` end-to-end rate), or absolute purchases/s: a fixed rate above capacity
  measures queueing, not the pump. Reported: p50 and p99 of each path and what the log and
  the pump add (pipeline minus baseline, per round, median); goal: p99 added <= 10 ms at
  50% of capacity.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from tools import roles
from tools.brokers import KINDS, Broker, make_broker
from tools.localstack import ROOT, pipeline_env
from tools.processes import Processes, wait_until

CASES = ("relay", "e2e", "latency")


def purchase(pid: str) -> dict[str, Any]:
    return {
        "purchase_id": pid,
        "customer": "bench",
        "items": [{"sku": "sku-1", "qty": 2}],
        "total_cents": 1999,
        "currency": "EUR",
    }


# ---------------------------------------------------------------------- processes
def start_workers(procs: Processes, n: int, first: int = 0) -> None:
    """n more workers, ``-c 1`` each, logging at WARNING (INFO would cost two lines a
    task); returns once each consumes (its ready file)."""
    started = [roles.start_worker(procs, f"bench{i}", 1, loglevel="WARNING", wait=False)
               for i in range(first, first + n)]  # fmt: skip
    for proc in started:
        roles.wait_worker(proc)


# ---------------------------------------------------------------------- measurements
def relay_delay(n: int, tag: str) -> float:
    from tasks.finance import record_revenue
    from tasks.warehouse import reserve_stock

    started = time.perf_counter()
    for i in range(n):
        doc = purchase(f"{tag}-{i}")
        reserve_stock.delay(doc)
        record_revenue.delay(doc)
    return n / (time.perf_counter() - started)


def relay_pump(app: Any, wal_dir: Path, n: int, tag: str) -> float:
    from tasks.targets import TARGETS, TASK_NAMES
    from walrelay.brokers.kombu import KombuPublisher
    from walrelay.deadletters import DeadLetterStore
    from walrelay.pump import Pump, PumpConfig
    from walrelay.record import Entry, TaskSpec
    from walstore import Options, SyncPolicy, Wal

    def purchase_entry(doc: dict[str, Any]) -> Entry:  # the record relay.send writes
        specs = (TaskSpec(str(i), TASK_NAMES[t], t, [doc]) for i, t in enumerate(TARGETS))
        return Entry(key=doc["purchase_id"], tasks=tuple(specs))

    shutil.rmtree(wal_dir, ignore_errors=True)
    with Wal.open(wal_dir, Options(sync=SyncPolicy.NONE)) as wal:
        entries = [purchase_entry(purchase(f"{tag}-{i}")).encode() for i in range(n)]
        for i in range(0, n, 1000):
            wal.append_batch(entries[i : i + 1000])
        publisher = KombuPublisher.for_app(app, wal.wal_id)
        pump = Pump(wal, publisher, DeadLetterStore(str(wal_dir)), PumpConfig(window=n))
        started = time.perf_counter()
        while pump.stats.published < 2 * n and time.perf_counter() - started < 120:
            pump.step()
        elapsed = time.perf_counter() - started
        publisher.close()
    return n / elapsed


def effects_done(url: str) -> Callable[[str, int], bool]:
    engine = create_engine(url)
    # A range on the primary key (target, purchase_id): no scan of earlier rounds' rows.
    query = text(
        "SELECT count(*) FROM ledger_effects WHERE target IN ('warehouse', "
        "'finance') AND purchase_id >= :lo AND purchase_id < :hi"
    )

    def done(tag: str, n: int) -> bool:
        with engine.connect() as conn:
            count = conn.execute(query, {"lo": f"{tag}-", "hi": f"{tag}."}).scalar_one()
            return int(count) >= 2 * n

    return done


def e2e(
    produce: Callable[[str], None], done: Callable[[str, int], bool], n: int, tag: str
) -> float:
    started = time.perf_counter()
    for i in range(n):
        produce(f"{tag}-{i}")
    wait_until(f"{n} purchases in the ledger", lambda: done(tag, n), 600, 0.02)
    return n / (time.perf_counter() - started)


def latency(
    produce: Callable[[str], None], url: str, rate: float, seconds: float, tag: str
) -> dict[str, float]:
    called: dict[str, float] = {}
    n = max(1, int(rate * seconds))
    start = time.perf_counter()
    for i in range(n):
        pause = start + i / rate - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        pid = f"{tag}-{i}"
        called[pid] = time.time()  # the call counts: record_purchase's fsync is the cost
        produce(pid)
    done = effects_done(url)
    wait_until("every effect", lambda: done(tag, n), 600, 0.05)
    engine = create_engine(url)
    sql = text(
        "SELECT purchase_id, max(first_at) FROM ledger_effects WHERE purchase_id >= :lo "
        "AND purchase_id < :hi GROUP BY purchase_id"
    )
    with engine.connect() as conn:
        rows = conn.execute(sql, {"lo": f"{tag}-", "hi": f"{tag}."}).all()
    lat = sorted((float(at) - called[pid]) * 1000 for pid, at in rows)
    return {
        "p50_ms": lat[len(lat) // 2],
        "p99_ms": lat[int(len(lat) * 0.99)],
        "max_ms": lat[-1],
        "achieved_rate": n / (time.perf_counter() - start),
    }


# ---------------------------------------------------------------------- the run
def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    broker = make_broker(args.broker, tmp / args.broker)
    broker.start()
    try:
        return measure(args, tmp, broker)
    finally:
        broker.stop()


def purge(app: Any, queues: tuple[str, ...] = ("warehouse", "finance")) -> None:
    """Empty the task queues between rounds (a channel each: on AMQP a missing queue
    closes the channel it was asked on)."""
    with app.connection_for_write() as conn:
        for name in queues:
            channel = conn.channel()
            try:
                channel.queue_purge(name)
            except conn.channel_errors:
                pass
            finally:
                with contextlib.suppress(Exception):
                    channel.close()


def relay_rounds(args: argparse.Namespace, app: Any, tmp: Path, events: bool) -> dict[str, Any]:
    """Baseline and pump, interleaved, with task-sent events on or off for both."""
    app.conf.task_send_sent_event = events
    out: dict[str, list[float]] = {"delay": [], "pump": []}
    tag = "e" if events else ""
    for r in range(args.rounds):
        out["delay"].append(relay_delay(args.relay, f"rd{tag}{r}"))
        purge(app)
        out["pump"].append(relay_pump(app, tmp / "relay-wal", args.relay, f"rp{tag}{r}"))
        purge(app)
    return out


def measure(args: argparse.Namespace, tmp: Path, broker: Broker) -> dict[str, Any]:
    """Every case against ``broker``, in ``tmp``."""
    env = pipeline_env(broker.url, tmp, broker.env(), {"WAL_SYNC": "always"})
    os.environ.update(env)  # this process's app and producer use the same settings
    from tasks.app import get_app
    from tasks.checkout import record_purchase

    app = get_app()  # record_purchase's too
    out: dict[str, Any] = {"broker": broker.kind}
    if "relay" in args.cases:
        out["relay"] = relay_rounds(args, app, tmp, events=False)
        out["relay_events"] = relay_rounds(args, app, tmp, events=True)
    # The rest with the baseline at its fastest: no task-sent events (they cost .delay()
    # ~30%); the pump then sends none either. Workers send their task events in both.
    app.conf.task_send_sent_event = False
    if not {"e2e", "latency"} & set(args.cases):
        return out
    # Workers and the pump through the tooling's one supervisor, stopped by PID.
    procs = Processes(tmp / "logs", ROOT, lambda extra: {**env, **(extra or {})})
    try:
        start_workers(procs, 2)
        roles.start_pump(procs)  # idle during the baseline rounds: both see the same processes

        def durable(pid: str) -> None:
            record_purchase(purchase(pid))

        if "e2e" in args.cases or "latency" in args.cases:
            # The latency rates are fractions of this capacity: always measured first.
            out["e2e"] = throughput(args, env, durable)
        if args.latency_workers > 2:
            start_workers(procs, args.latency_workers - 2, first=2)
        if "latency" in args.cases:
            capacity = capacity_of(out) * args.latency_workers / 2
            out["latency"] = latencies(args, env, durable, capacity)
    finally:
        procs.stop_all(timeout=20)
    return out


def throughput(
    args: argparse.Namespace, env: dict[str, str], durable: Callable[[str], None]
) -> dict[str, list[float]]:
    """End-to-end rounds, interleaved (baseline, pipeline, baseline, ...)."""
    done = effects_done(env["LEDGER_URL"])
    delay = make_delay_producer()
    out: dict[str, list[float]] = {"delay": [], "pump": []}
    for r in range(args.rounds):
        out["delay"].append(e2e(delay, done, args.e2e, f"ed{r}"))
        out["pump"].append(e2e(durable, done, args.e2e, f"ep{r}"))
    return out


def latencies(
    args: argparse.Namespace,
    env: dict[str, str],
    durable: Callable[[str], None],
    capacity: float,
) -> dict[str, Any]:
    """Each rate, ``--rounds`` times, pipeline and baseline alternating which goes first."""
    delay = make_delay_producer()
    url = env["LEDGER_URL"]
    out: dict[str, Any] = {"workers": args.latency_workers, "capacity": capacity, "rates": []}
    for spec in args.rates:
        rate = spec.of(capacity)
        runs: dict[str, list[dict[str, float]]] = {"pump": [], "delay": []}
        for r in range(args.rounds):
            tag = f"{rate:.0f}r{r}"
            order = (("pump", durable), ("delay", delay))
            for name, produce in order if r % 2 == 0 else order[::-1]:
                runs[name].append(latency(produce, url, rate, args.seconds, f"l{name[0]}{tag}"))
        out["rates"].append({"spec": spec.text, "rate": rate, **runs})
    return out


class Rate:
    """``--rates`` item: ``50%`` of the measured capacity, or ``120`` purchases/s."""

    def __init__(self, text: str) -> None:
        self.text = text.strip()
        number = self.text.rstrip("%")
        try:
            value = float(number)
        except ValueError:
            raise argparse.ArgumentTypeError(f"rate {text!r}: a number or a percentage") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"rate {text!r}: must be positive")
        self.fraction = value / 100 if self.text.endswith("%") else None
        self.value = value

    def of(self, capacity: float) -> float:
        return self.value if self.fraction is None else self.fraction * capacity


def parse_rates(value: str) -> list[Rate]:
    return [Rate(v) for v in value.split(",") if v.strip()]


def capacity_of(out: dict[str, Any]) -> float:
    """The end-to-end capacity: the ``.delay()`` baseline's median rate (the pump's is
    within a few percent of it; the workers are the limit)."""
    return float(statistics.median(out["e2e"]["delay"]))


def make_delay_producer() -> Callable[[str], None]:
    from tasks.finance import record_revenue
    from tasks.warehouse import reserve_stock

    def produce(pid: str) -> None:
        doc = purchase(pid)
        reserve_stock.delay(doc)
        record_revenue.delay(doc)

    return produce


def report(out: dict[str, Any], args: argparse.Namespace) -> str:
    rows: list[tuple[str, str, str, str, str]] = []
    for key, what in (("relay", "events off"), ("relay_events", "task-sent events on")):
        if key in out:
            delay, pump = (statistics.median(out[key][k]) for k in ("delay", "pump"))
            rows.append((f"relay on {out['broker']}, workers stopped, {what} (purchases/s)",
                         f"{delay:,.0f}", f"{pump:,.0f}", f"{pump / delay:.1f}x",
                         ">= 5x"))  # fmt: skip
    if "e2e" in out:
        e2e_delay, e2e_pump = (statistics.median(out["e2e"][k]) for k in ("delay", "pump"))
        rows.append(("end to end, 2 workers (purchases/s)", f"{e2e_delay:,.0f}",
                     f"{e2e_pump:,.0f}", f"{e2e_pump / e2e_delay:.2f}x", ">= 0.9x"))  # fmt: skip
    latency = out.get("latency")
    if latency:
        workers, capacity = latency["workers"], latency["capacity"]
        for item in latency["rates"]:
            pump, delay = item["pump"], item["delay"]
            goal = item["spec"] == "50%"
            for q in ("p50", "p99"):
                key = f"{q}_ms"
                added = statistics.median(p[key] - d[key] for p, d in zip(pump, delay, strict=True))
                base = statistics.median(d[key] for d in delay)
                mine = statistics.median(p[key] for p in pump)
                rows.append((f"latency at {item['spec']} of capacity ({item['rate']:.0f}/s of "
                             f"{capacity:.0f}/s), {workers} workers, {q} (ms)",
                             f"{base:.1f}", f"{mine:.1f}", f"+{added:.1f} ms",
                             "p99 added <= 10 ms" if goal and q == "p99" else ""))  # fmt: skip
    head = ("case", ".delay() baseline", "log + pump", "ratio / added", "target")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(5)]
    lines = [
        "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
        for r in [head, *rows]
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.pipeline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--relay", type=int, default=4000, help="purchases per relay round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per case (median)")
    parser.add_argument("--e2e", type=int, default=1000, help="purchases per end-to-end round")
    parser.add_argument(
        "--rates",
        type=parse_rates,
        default=parse_rates("50%,80%"),
        help="latency runs: percent of the measured end-to-end capacity (50%%) or purchases/s"
        " (comma separated)",
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="latency run length")
    parser.add_argument("--latency-workers", type=int, default=2, help="workers (-c 1 each)")
    parser.add_argument("--broker", choices=KINDS, default="redis", help="the broker")
    parser.add_argument(
        "--cases",
        type=lambda v: [c for c in v.split(",") if c],
        default=list(CASES),
        help=f"which of {','.join(CASES)} to run (comma separated)",
    )
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args(argv)
    if not args.cases or set(args.cases) - set(CASES):
        parser.error(f"--cases: one or more of {','.join(CASES)}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    try:
        out = run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(report(out, args))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
