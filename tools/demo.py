"""The demo: the whole pipeline on this machine, on embedded defaults.

    python -m tools.demo [--count 3000] [--exit]        (``make demo`` runs it)

Starts a ``LocalStack`` in ``var/demo`` (a private redis-server, two Celery workers, the
pump, the web app with two uvicorn workers, Flower; SQLite ledger), prints the URLs of
the web app and Flower, POSTs ``--count`` purchases to the web app from a few threads
with a progress bar, kills the broker with -9 and restarts it (empty) half-way through,
waits until every acknowledged purchase reached the warehouse and finance, and prints a
summary: acknowledged, delivered per target, duplicates absorbed, lost, how long the
pipeline took to catch up after the broker came back. Then it keeps the stack running
for you to look around (Flower, ``celery -A worker ledger``) until Ctrl-C, which stops
everything it started; ``--exit`` stops right after the summary.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tools.audit import TARGETS, Audit, WalMonitor, audit
from tools.loadgen import purchase
from tools.localstack import LocalStack
from tools.processes import StackError, raise_on_sigterm

err = Console(stderr=True)


@dataclass
class Drive:
    """What the POSTs got back."""

    attempted: list[str] = field(default_factory=list)
    acknowledged: list[str] = field(default_factory=list)
    refused: dict[int, int] = field(default_factory=dict)  # status (0: no answer): count
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, pid: str, status: int) -> None:
        with self.lock:
            self.attempted.append(pid)
            if status == 201:
                self.acknowledged.append(pid)
            else:
                self.refused[status] = self.refused.get(status, 0) + 1


class Poster:
    """POSTs purchases to the web app, a fresh connection each: on a kept-alive one every
    request to this uvicorn (h11) stalls ~40 ms (a delayed-ACK pattern), 20x its cost."""

    def __init__(self, base_url: str) -> None:
        self.netloc = urlsplit(base_url).netloc

    def post(self, doc: dict[str, Any]) -> int:
        """POST /purchases; the status code, 0 if no answer came."""
        conn = http.client.HTTPConnection(self.netloc, timeout=30)
        try:
            conn.request("POST", "/purchases", json.dumps(doc).encode(),
                         {"Content-Type": "application/json"})  # fmt: skip
            response = conn.getresponse()
            response.read()
            return int(response.status)
        except (OSError, http.client.HTTPException):
            return 0
        finally:
            conn.close()


def progress() -> Progress:
    return Progress(
        TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=err,
    )  # fmt: skip


def drive(stack: LocalStack, args: argparse.Namespace, run: str, back: list[float]) -> Drive:
    """POST ``args.count`` purchases; kill -9 and restart the broker at half-way. Appends
    (monotonic time, high water mark) of the broker's return to ``back``."""
    out, poster = Drive(), Poster(stack.web_url)
    half = threading.Event()

    def one(n: int) -> None:
        pid = f"{run}-{n}"
        out.record(pid, poster.post(purchase(pid, n)))
        if len(out.attempted) >= args.count // 2:
            half.set()

    with progress() as bar, ThreadPoolExecutor(args.threads) as pool:
        task = bar.add_task("POST /purchases", total=args.count)
        futures = [pool.submit(one, n) for n in range(args.count)]
        restarted = False
        for future in futures:
            future.result()
            bar.advance(task)
            if half.is_set() and not restarted:
                restarted = True
                stack.broker.lose_everything()
                back.extend([time.monotonic(), float(stack.wal().high_water_mark)])
                bar.console.print("[bold red]broker killed (-9) and restarted empty[/]")
    return out


def wait_delivered(stack: LocalStack, acked: set[str], timeout: float) -> bool:
    """Until every acknowledged purchase is in both targets and the log has nothing
    unconfirmed; False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    with progress() as bar:
        task = bar.add_task("delivered to both targets", total=len(acked))
        while True:
            snap = stack.ledger()
            done = len(acked.intersection(*(snap[t] for t in TARGETS)))
            bar.update(task, completed=done)
            if done == len(acked) and stack.wal().pending == 0:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)


def summary(result: Audit, stack: LocalStack, recovery: float | None, drained: bool) -> Table:
    table = Table(title="demo summary", show_header=False)
    table.add_row("purchases acknowledged (201)", str(result.acknowledged))
    for target in TARGETS:
        table.add_row(f"delivered to {target}", f"{result.effects[target]} "
                      f"({result.deliveries[target]} deliveries)")  # fmt: skip
    table.add_row("duplicates absorbed", str(sum(result.duplicates.values())))
    table.add_row("lost", str(len(result.lost)))
    table.add_row("double effects", str(result.double_effects))
    table.add_row("recovery after the broker restart",
                  "-" if recovery is None else f"{recovery:.1f}s")  # fmt: skip
    table.add_row("drained", "yes" if drained else "NO (timed out)")
    crashed = ", ".join(c.role for c in stack.crashes) or "none"
    table.add_row("crashed and restarted by the supervisor", crashed)
    table.add_row("Flower", stack.flower_url)
    table.add_row("web app", stack.web_url)
    return table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=3000, help="purchases to POST (default 3000)")
    p.add_argument("--threads", type=int, default=4, help="concurrent POSTs (default 4)")
    p.add_argument("--workdir", type=Path, default=Path("var/demo"), help="default var/demo")
    p.add_argument("--drain-timeout", type=float, default=120.0, help="longest drain wait")
    p.add_argument("--exit", action="store_true", help="stop after the summary")
    p.add_argument("--json", action="store_true", help="the summary as JSON on stdout")
    args = p.parse_args(argv)
    if args.count < 2 or args.threads < 1:
        p.error("--count must be at least 2 and --threads at least 1")
    return args


def run_demo(stack: LocalStack, args: argparse.Namespace) -> int:
    stack.start(web=True, flower=True)
    stack.start_supervisor()
    err.print(f"web app: [bold]{stack.web_url}[/]  (POST /purchases, GET /metrics)")
    err.print(f"Flower:  [bold]{stack.flower_url}[/]")
    err.print(f"pump:    [bold]{stack.metrics_url}[/]  (Prometheus metrics)")
    monitor = WalMonitor(stack.wal)
    monitor.start()
    run, back = f"demo{int(time.time())}", list[float]()
    posted = drive(stack, args, run, back)
    drained = wait_delivered(stack, set(posted.acknowledged), args.drain_timeout)
    monitor.stop()
    recovery = monitor.recovery(back[0], int(back[1])) if back else None
    result = audit(posted.attempted, posted.acknowledged, stack.ledger_url, prefix=f"{run}-")
    if args.json:
        doc = {**result.as_dict(), "recovery": recovery, "drained": drained,
               "refused": posted.refused, "flower_url": stack.flower_url,
               "web_url": stack.web_url, "crashes": len(stack.crashes)}  # fmt: skip
        print(json.dumps(doc), flush=True)
    else:
        Console().print(summary(result, stack, recovery, drained))
    ok = result.ok and drained
    if not args.exit:
        err.print(f"Everything keeps running: Flower at {stack.flower_url}. Ctrl-C stops it all.")
        while True:
            time.sleep(3600)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_on_sigterm()
    stack = LocalStack(args.workdir)
    try:
        return run_demo(stack, args)
    except KeyboardInterrupt:
        err.print("stopping everything the demo started")
        return 130
    except StackError as exc:
        err.print(f"demo: {exc}")
        return 2
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
