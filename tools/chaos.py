"""The chaos command: run the whole pipeline locally, break it on a seeded schedule, wait
for the drain, and report what the users were promised against what happened.

    python -m tools.chaos --duration 300 --seed 42 [--broker redis|rabbitmq|sentinel] [--json]

A ``LocalStack`` in a fresh work directory (default ``var/chaos/seed<seed>-<time>``:
a private broker (``--broker``: a redis-server, a RabbitMQ node or a Redis Sentinel set,
each faulted in its own terms, see ``tools.brokers``), workers, the pump, SQLite ledger,
small WAL segments so that the log rolls over and is pruned under fire) with producer
processes appending purchases throughout. The faults (``tools.faults``) come from
``plan(seed, duration)``: the same seed and duration give the same schedule. After
``--duration`` s the producers stop, the command waits (at most ``--drain-timeout`` s)
until the log has nothing unconfirmed, stops everything it started and prints the report
(``--json``: as JSON on stdout). Progress goes to stderr. Exit status 0 only if nothing
acknowledged was lost, no effect happened twice, the drain finished and no process was
left running.

Bounded: start-up is bounded per process (60 s), the run by ``--duration``, the drain by
``--drain-timeout``; Ctrl-C, SIGTERM or an error stop everything it started.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tools.audit import Audit, WalMonitor, audit
from tools.brokers import KINDS
from tools.faults import BROKER_KINDS, Fault, Injected, Injector, plan
from tools.loadgen import ProducerPool
from tools.localstack import LocalStack
from tools.processes import StackError, raise_on_sigterm
from walrelay.deadletters import DeadLetterStore

# Small segments: a few hundred purchases each, so the log rolls and is pruned often.
CHAOS_ENV = {"WAL_SEGMENT_BYTES": "262144"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tools.chaos", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )  # fmt: skip
    p.add_argument("--duration", type=float, default=300.0, help="seconds of load and faults")
    p.add_argument("--seed", type=int, default=None, help="schedule seed (default: random)")
    p.add_argument("--rate", type=float, default=40.0, help="purchases/s, all producers")
    p.add_argument("--producers", type=int, default=2, help="producer processes")
    p.add_argument("--workers", type=int, default=2, help="celery worker processes")
    p.add_argument("--broker", choices=KINDS, default="redis", help="the broker to break")
    p.add_argument("--concurrency", type=int, default=2, help="pool processes per worker")
    p.add_argument("--mean-gap", type=float, default=8.0, help="mean seconds between faults")
    p.add_argument("--drain-timeout", type=float, default=120.0, help="longest drain wait")
    p.add_argument("--workdir", type=Path, default=None, help="default var/chaos/seed<N>-<t>")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--plan", action="store_true", help="print the schedule only; run nothing")
    args = p.parse_args(argv)
    if args.duration <= 0 or args.rate <= 0 or min(args.producers, args.workers) < 1:
        p.error("--duration, --rate, --producers and --workers must be positive")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1_000_000)
    return args


def schedule_of(args: argparse.Namespace) -> list[Fault]:
    return plan(args.seed, args.duration, workers=args.workers, producers=args.producers,
                mean_gap=args.mean_gap)  # fmt: skip


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class ChaosRun:
    """One run: the stack, its producers, the monitor, and what the faults did."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.faults = schedule_of(args)
        self.stack = LocalStack(workdir, workers=args.workers, concurrency=args.concurrency,
                                env=CHAOS_ENV, broker=args.broker)  # fmt: skip
        self.monitor = WalMonitor(self.stack.wal)
        self.pool: ProducerPool | None = None
        self.injected: list[Injected] = []
        self.skipped: list[Fault] = []  # not started before the end (earlier ones overran)
        self.t0 = 0.0
        self.drain_seconds: float | None = None

    def clock(self) -> float:
        return time.monotonic() - self.t0

    def run(self) -> None:
        say(f"chaos: seed {self.args.seed}, {self.args.duration:g}s, {len(self.faults)} "
            f"faults; work dir {self.stack.workdir}")  # fmt: skip
        self.stack.start()
        self.stack.start_supervisor()
        self.t0 = time.monotonic()
        self.pool = ProducerPool(self.stack, self.args.producers, self.args.rate,
                                 time.time() + self.args.duration)  # fmt: skip
        self.pool.start()
        self.monitor.start()
        self._inject_all(Injector(self.stack, self.pool, self.t0))
        time.sleep(max(0.0, self.args.duration - self.clock()))
        self.pool.wait(30)
        self._drain()

    def _inject_all(self, injector: Injector) -> None:
        for fault in self.faults:
            time.sleep(max(0.0, fault.at - self.clock()))
            if self.clock() >= self.args.duration:
                self.skipped = self.faults[len(self.injected) :]
                say(f"[{self.clock():6.1f}s] out of time: {len(self.skipped)} fault(s) skipped")
                return
            done = injector.inject(fault)
            self.injected.append(done)
            outcome = done.error or done.note or "done"
            say(f"[{done.started:6.1f}s] {fault.describe()}: {outcome}")

    def _drain(self) -> None:
        started = time.monotonic()
        hard_deadline = self.t0 + self.args.duration + self.args.drain_timeout
        say(f"[{self.clock():6.1f}s] producers stopped; draining")
        while time.monotonic() < hard_deadline:
            if self.monitor.sample() is not None and self.stack.wal().pending == 0:
                self.drain_seconds = time.monotonic() - started
                return
            time.sleep(0.2)
        say(f"[{self.clock():6.1f}s] drain timed out: {self.stack.wal().pending} unconfirmed")

    def finish(self) -> None:
        self.monitor.stop()
        self.stack.stop()
        for done in self.injected:
            if done.back_at is not None and done.back_hwm is not None:
                done.recovery = self.monitor.recovery(self.t0 + done.back_at, done.back_hwm)

    def report(self) -> dict[str, Any]:
        attempted, acked = self.pool.journal() if self.pool else (set(), set())
        result = audit(attempted, acked, self.stack.ledger_url)
        broker = [d for d in self.injected if d.fault.kind in BROKER_KINDS]
        longest = max(broker, key=lambda d: d.recovery or 0.0, default=None)
        doc = {
            "seed": self.args.seed,
            "broker": self.args.broker,
            "duration": self.args.duration,
            "workdir": str(self.stack.workdir),
            "replay": f"python -m tools.chaos --duration {self.args.duration:g} "
            f"--seed {self.args.seed} --broker {self.args.broker}",
            "faults": [d.as_dict() for d in self.injected],
            "skipped_faults": [asdict(f) for f in self.skipped],
            **result.as_dict(),
            "dead_letters": len(DeadLetterStore(str(self.stack.wal_dir)).list()),
            "drained": self.drain_seconds is not None,
            "drain_seconds": self.drain_seconds,
            "longest_broker_recovery": longest.recovery if longest else None,
            "longest_broker_recovery_fault": longest.as_dict() if longest else None,
            "unrecovered_faults": sum(
                1 for d in self.injected if d.back_at is not None and d.recovery is None
            ),
            "crashes": [
                {
                    "at": round(c.at - self.t0, 1),
                    "role": c.role,
                    "returncode": c.returncode,
                    "log": str(c.log),
                }
                for c in self.stack.crashes
            ],
            "tasks_lost_with_their_pool_process": self._worker_lost(),
            "wal": self.stack.wal().as_dict(),
            "left_running": self.stack.leftovers(),
        }
        doc["ok"] = verdict(result, doc)
        return doc

    def _worker_lost(self) -> int:
        """Tasks whose pool process died under them, as the workers logged it."""
        logs = [p.log for p in self.stack.started if p.role.startswith("worker")]
        return sum(
            log.read_text(errors="replace").count("raised error: WorkerLostError") for log in logs
        )


def verdict(result: Audit, doc: dict[str, Any]) -> bool:
    return bool(result.ok and doc["drained"] and not doc["left_running"])


def render(doc: dict[str, Any]) -> str:
    """The report as text."""
    lines = [f"chaos report: seed {doc['seed']}, broker {doc['broker']}, {doc['duration']:g}s, "
             f"{len(doc['faults'])} faults injected", "faults:"]  # fmt: skip
    for f in doc["faults"]:
        rec = f.get("recovery")
        after = "" if f["back_at"] is None else (
            f"recovered in {rec:.1f}s" if rec is not None else "NOT recovered")  # fmt: skip
        what = Fault(f["at"], f["kind"], f["hold"], f["target"]).describe()
        note = f["error"] or f["note"] or ""
        lines.append(f"  {f['started']:6.1f}s  {what:<30} {after:<19} {note}".rstrip())
    for f in doc["skipped_faults"]:
        what = Fault(f["at"], f["kind"], f["hold"], f["target"]).describe()
        lines.append(f"  {f['at']:6.1f}s  {what:<30} skipped: the run was over before it")
    dup = doc["duplicates"]
    longest = doc["longest_broker_recovery"]
    rows = [
        ("purchases acknowledged", f"{doc['acknowledged']} (of {doc['attempted']} attempted;"
         f" {doc['unacknowledged_delivered']} committed before their producer was killed,"
         " delivered too)"),
        *((f"effects {t}", f"{n} ({doc['deliveries'][t]} deliveries)")
          for t, n in doc["effects"].items()),
        ("duplicate deliveries absorbed", f"{doc['duplicates_absorbed']} ("
         + ", ".join(f"{t} {n}" for t, n in dup.items()) + ")"),
        ("lost", str(doc["lost"]) + (f" {doc['lost_ids']}" if doc["lost"] else "")),
        ("double effects", str(doc["double_effects"])),
        ("phantom effects", str(doc["phantoms"])),
        ("dead letters", str(doc["dead_letters"])),
        ("tasks lost with their pool process", f"{doc['tasks_lost_with_their_pool_process']}"
         " (requeued: task_reject_on_worker_lost)"),
        ("crashed and restarted", f"{len(doc['crashes'])}" + "".join(
            f"; {c['role']} at {c['at']:.1f}s (exit {c['returncode']})"
            for c in doc["crashes"])),
        ("drain", f"{doc['drain_seconds']:.1f}s" if doc["drained"] else "TIMED OUT"),
        ("longest recovery after the broker returned",
         "-" if longest is None else f"{longest:.1f}s ("
         f"{doc['longest_broker_recovery_fault']['kind']} at "
         f"{doc['longest_broker_recovery_fault']['started']:.1f}s)"),
        ("processes left running", str(len(doc["left_running"]))),
        ("seed", f"{doc['seed']} (replay: {doc['replay']})"),
        ("verdict", "OK" if doc["ok"] else "FAILED"),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    return "\n".join(lines + [f"{k:<{width}}  {v}" for k, v in rows])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plan:
        faults = schedule_of(args)
        print(json.dumps([asdict(f) for f in faults]) if args.json else
              "\n".join(f"{f.at:6.1f}s  {f.describe()}" for f in faults))  # fmt: skip
        return 0
    stamp = time.strftime("%Y%m%d-%H%M%S")
    workdir = args.workdir or Path("var/chaos") / f"seed{args.seed}-{stamp}"
    raise_on_sigterm()
    run = ChaosRun(args, workdir)
    status = None
    try:
        run.run()
    except KeyboardInterrupt:
        say("chaos: interrupted; stopping everything it started")
        status = 130
    except StackError as exc:
        say(f"chaos: {exc}")
        status = 2
    finally:
        run.finish()
    if status is not None:
        return status
    doc = run.report()
    print(json.dumps(doc, indent=1) if args.json else render(doc), flush=True)
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
