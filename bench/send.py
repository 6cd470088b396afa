"""relay.send benchmark: what the send path and the idempotency index cost over a raw
append, with N producer processes each sending one durable record at a time.

    python -m bench.send [--procs 16] [--seconds 3] [--rounds 3] [--json out.json]

Cases, run in turn each round (this machine class is noisy: compare within a round):
- raw: ``Wal.append`` of a record the size of a purchase's.
- send: ``relay.send(a.s(p), b.s(p))``, no key.
- keyed: the same with ``key=`` distinct per send (the index's look-up, insert, locks).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

from celery import Celery

from walrelay import Relay, RelaySettings
from walstore import Options, Wal

CASES = ("raw", "send", "keyed")


def _app() -> tuple[Celery, Any, Any]:
    app = Celery("bench", broker="memory://", set_as_current=False)

    @app.task(name="bench.reserve")
    def reserve(p: dict[str, Any]) -> None: ...

    @app.task(name="bench.revenue")
    def revenue(p: dict[str, Any]) -> None: ...

    return app, reserve, revenue


def _purchase(proc: int, n: int) -> dict[str, Any]:
    return {"purchase_id": f"p{proc}-{n}", "customer": "bench", "currency": "EUR",
            "items": [{"sku": "sku-1", "qty": 1}], "total_cents": n}  # fmt: skip


def _worker(case: str, wal_dir: str, proc: int, seconds: float, start: Any, out: Any) -> None:
    app, reserve, revenue = _app()
    relay = Relay(app, wal_dir, settings=RelaySettings(wal_dir=wal_dir), wal_options=Options())
    wal = relay.wal()
    if case != "raw":  # finalize the app (and open the index) before the clock starts
        relay.send(reserve.s(_purchase(proc, -1)), key=f"warm-{proc}" if case == "keyed" else None)
    start.wait()
    n, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        p = _purchase(proc, n)
        if case == "raw":
            doc = {"v": 2, "key": None, "tasks": [{"name": "bench.reserve", "args": [p]}] * 2}
            wal.append(json.dumps(doc).encode())
        elif case == "send":
            relay.send(reserve.s(p), revenue.s(p))
        else:
            relay.send(reserve.s(p), revenue.s(p), key=f"k{proc}-{n}")
        n += 1
    out.put(n)


def run_case(case: str, procs: int, seconds: float, root: str) -> float:
    wal_dir = os.path.join(root, case)
    shutil.rmtree(wal_dir, ignore_errors=True)
    Wal.open(wal_dir, Options()).close()
    ctx = mp.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    workers = [
        ctx.Process(target=_worker, args=(case, wal_dir, i, seconds, start, out))
        for i in range(procs)
    ]
    for w in workers:
        w.start()
    time.sleep(1.0)  # every worker has opened the log (and the index)
    start.set()
    total = sum(int(out.get(timeout=seconds + 60)) for _ in workers)
    for w in workers:
        w.join(30)
    return total / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--procs", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    rates: dict[str, list[float]] = {c: [] for c in CASES}
    with tempfile.TemporaryDirectory(prefix="bench-send-") as root:
        for r in range(args.rounds):
            for case in CASES:
                rates[case].append(run_case(case, args.procs, args.seconds, root))
            line = ", ".join(f"{c} {rates[c][-1]:,.0f}/s" for c in CASES)
            print(f"round {r + 1}: {line}; keyed/raw {rates['keyed'][-1] / rates['raw'][-1]:.2f}")
    ratios = [k / r for k, r in zip(rates["keyed"], rates["raw"], strict=True)]
    summary = {c: statistics.median(v) for c, v in rates.items()}
    print(f"median: {summary}; keyed/raw per round {[round(x, 2) for x in ratios]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"procs": args.procs, "rates": rates, "keyed_over_raw": ratios}, f)


if __name__ == "__main__":
    main()
