"""Slow consumers, simulated: the real ``Pump`` on a real (temporary) log, an in-memory
broker with FIFO queues, simulated workers and a simulated clock.

    python -m bench.slow_consumer [--scenario NAME ...] [--json out.json]

Workers never fail and no message is ever lost, so every delivery beyond one per task is
a duplicate the pump caused, every task counted lost was not, and every dead letter is
false. Each worker runs one task at a time at its rate (tasks/s) and acks it at once,
echoing the copy it ran when the message names one. Scenarios (purchases/s in, each a
warehouse and a finance task):

- ``slow``: 3/s for 15 min; each queue drains 2 tasks/s (a backlog of ~7.5 min at the
  end, well past ``PUMP_MAX_ACK_TIMEOUT``).
- ``finance-down-20m``: 5/s for 20 min with the finance workers down all along; they
  come back at 20 tasks/s (the warehouse runs at 20 tasks/s throughout).
- ``finance-down-1h``: the same at 10/s for 1 h.

Printed per scenario: task runs / effects, re-sends per task (mean and max), tasks
counted lost, dead letters, the longest queue seen (``-v`` shows the pump's log).
Default pump settings except the pacing knobs (idle wait, ack interval, checkpoint
interval) that only set the simulation step. A scenario ends when every effect
happened, the pump has nothing in flight and the queues are empty (or at a time cap).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tasks.checkout import validate
from tasks.targets import TARGETS, TASK_NAMES
from walrelay.broker import Ack, TaskMessage
from walrelay.brokers.stub import MemoryPublisher
from walrelay.deadletters import DeadLetterStore
from walrelay.pump import Pump, PumpConfig
from walrelay.record import Entry, TaskSpec, parse_task_id
from walstore import Options, SyncPolicy, Wal

QUEUES = ("warehouse", "finance")
STEP_CONFIG: dict[str, Any] = {"idle_wait": 0.05, "ack_interval": 0.05, "checkpoint_interval": 5.0,
               "session_interval": 1.0, "log_interval": 1e9}  # fmt: skip


def purchase_entry(purchase: dict[str, Any]) -> Entry:
    """A purchase's record with named targets (relay.send numbers them "0", "1")."""
    return Entry(
        key=purchase["purchase_id"],
        tasks=tuple(TaskSpec(t, TASK_NAMES[t], t, [purchase]) for t in TARGETS),
    )


@dataclass(frozen=True)
class Scenario:
    name: str
    rate: float  # purchases/s in
    seconds: float  # how long purchases come in
    # queue -> (time, tasks/s) steps: the rate from that time on
    workers: dict[str, tuple[tuple[float, float], ...]]
    cap: float = 4 * 3600.0  # simulated seconds at most

    def worker_rate(self, queue: str, now: float) -> float:
        rate = 0.0
        for since, value in self.workers[queue]:
            if now >= since:
                rate = value
        return rate


def down_then_up(rate: float, seconds: float) -> Scenario:
    """Purchases at ``rate`` for ``seconds`` while the finance workers are down."""
    minutes = f"{seconds / 3600:g}h" if seconds >= 3600 else f"{seconds / 60:g}m"
    workers = {"warehouse": ((0.0, 20.0),), "finance": ((0.0, 0.0), (seconds, 20.0))}
    return Scenario(f"finance-down-{minutes}", rate, seconds, workers)


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("slow", 3.0, 900.0, {"warehouse": ((0, 2.0),), "finance": ((0, 2.0),)}),
        down_then_up(5.0, 1200.0),
        down_then_up(10.0, 3600.0),
    )
}


class SimClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Result:
    scenario: str
    purchases: int = 0
    effects: int = 0
    runs: int = 0
    resends_mean: float = 0.0
    resends_max: int = 0
    lost: int = 0
    dead_letters: int = 0
    max_queued: int = 0
    sim_seconds: float = 0.0
    wall_seconds: float = 0.0
    runs_per_effect: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def ack_for(msg: TaskMessage) -> Ack:
    """What the worker's ack handler sends: the copy it ran, if the message names one."""
    parsed = parse_task_id(msg.task_id)
    assert parsed is not None
    copy = getattr(msg, "copy", None)
    if copy is not None and "copy" in {f.name for f in dataclasses.fields(Ack)}:
        return Ack(*parsed, ok=True, **{"copy": copy})
    return Ack(*parsed, ok=True)


def run(scenario: Scenario, make_pump: Callable[..., Pump] = Pump) -> Result:
    tmp = tempfile.mkdtemp(prefix="bench-slow-")
    started = time.monotonic()
    wal = Wal.open(f"{tmp}/wal", Options(sync=SyncPolicy.NONE))
    try:
        return _simulate(scenario, wal, DeadLetterStore(f"{tmp}/wal"), make_pump, started)
    finally:
        wal.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _simulate(
    scenario: Scenario,
    wal: Wal,
    deadletters: DeadLetterStore,
    make_pump: Callable[..., Pump],
    started: float,
) -> Result:
    clock = SimClock()
    broker = MemoryPublisher(wal.wal_id)
    pump = make_pump(wal, broker, deadletters, PumpConfig(**STEP_CONFIG), clock=clock,
                     sleep=clock.advance)  # fmt: skip
    runs: Counter[tuple[str, str]] = Counter()
    credit = dict.fromkeys(QUEUES, 0.0)
    appended, last, max_queued = 0, 0.0, 0
    total = round(scenario.rate * scenario.seconds)
    while clock.now < scenario.cap:
        pump.step()
        now = clock.now
        due = min(total, int(scenario.rate * min(now, scenario.seconds)))
        for i in range(appended, due):
            purchase = validate({"purchase_id": f"p{i}", "customer": "bench",
                                 "items": [{"sku": "s", "qty": 1}], "total_cents": 1,
                                 "currency": "EUR"})  # fmt: skip
            wal.append(purchase_entry(purchase).encode())
        appended = due
        for queue in QUEUES:
            q = broker.queues.get(queue)
            credit[queue] += scenario.worker_rate(queue, now) * (now - last)
            while q and credit[queue] >= 1.0:
                msg = q.popleft()
                credit[queue] -= 1.0
                runs[(queue, msg.task_id)] += 1
                broker.send_ack(ack_for(msg))
            if not q:
                credit[queue] = min(credit[queue], 1.0)  # an idle worker banks nothing
        max_queued = max(max_queued, sum(len(q) for q in broker.queues.values()))
        last = now
        idle = not any(broker.queues.values()) and not pump.inflight
        if appended == total and len(runs) == 2 * total and idle:
            break
    stats = pump.stats
    counts = list(runs.values())
    result = Result(
        scenario=scenario.name,
        purchases=appended,
        effects=len(runs),
        runs=sum(counts),
        resends_mean=round(sum(c - 1 for c in counts) / max(len(counts), 1), 3),
        resends_max=max(counts, default=1) - 1,
        lost=stats.lost,
        dead_letters=len(deadletters.list()),
        max_queued=max_queued,
        sim_seconds=round(clock.now, 1),
        wall_seconds=round(time.monotonic() - started, 1),
    )
    result.runs_per_effect = round(result.runs / max(result.effects, 1), 3)
    result.extra = {"published": stats.published, "redelivered": stats.redelivered,
                    "in_flight_at_end": len(pump.inflight)}  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS),
                        help="run only these (default: all)")  # fmt: skip
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the pump's log")
    args = parser.parse_args(argv)
    if not args.verbose:
        logging.getLogger("walrelay").setLevel(logging.CRITICAL)
    results = []
    for name in args.scenario or list(SCENARIOS):
        res = run(SCENARIOS[name])
        results.append(dataclasses.asdict(res))
        print(f"{res.scenario:18} runs/effects {res.runs}/{res.effects} = "
              f"{res.runs_per_effect:.3f}x  re-sends per task mean {res.resends_mean} max "
              f"{res.resends_max}  counted lost {res.lost}  dead letters {res.dead_letters}  "
              f"max queued {res.max_queued}  ({res.sim_seconds:.0f} s simulated in "
              f"{res.wall_seconds:.0f} s)", flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    ok = all(r["runs_per_effect"] <= 1.05 and r["dead_letters"] == 0 for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
