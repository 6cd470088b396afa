"""walstore benchmark: durable appends against SQLite, reading, open time, memory.

    python -m bench.wal [--seconds 3] [--records 1000000] [--json out.json]

Every figure is measured in this run, next to its baseline, because this machine class is
noisy (the same case can differ by 40% twenty minutes apart): compare the ratios.
- appends: N producer processes (1, 4, 16) append 256-byte JSON records, each one durable
  (fdatasync, group commit) before the next; SQLite in WAL mode with synchronous=FULL, one
  row per commit, same N, same record, same disk, same duration.
- read: records/s through ``Wal.iter_from`` over the whole log.
- open: time for ``Wal.open`` on a log of ``--records`` records (recovery path: the
  process is alone, so it checks the chain and scans the newest segment only).
- memory: peak RSS growth of a child that opens and reads the whole log, at 1/10 and at
  the full size: flat means it does not depend on the log's size.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable
from typing import Any

from walstore import Options, SyncPolicy, Wal

RECORD = 256
CONCURRENCY = (1, 4, 16)


def _payload(proc: int, n: int) -> bytes:
    doc = json.dumps({"purchase_id": f"p{proc}-{n}", "customer": "bench", "total_cents": n})
    return doc.encode().ljust(RECORD - 1, b" ") + b"\n"


def _wal_producer(directory: str, proc: int, start: float, stop: float, out: Any) -> None:
    wal = Wal.open(directory)
    n = 0
    while time.time() < start:
        time.sleep(0.0005)
    while time.time() < stop:
        wal.append(_payload(proc, n))
        n += 1
    wal.close()
    out.put(n)


def _sqlite_producer(path: str, proc: int, start: float, stop: float, out: Any) -> None:
    db = sqlite3.connect(path, timeout=60, isolation_level=None)
    db.execute("PRAGMA synchronous=FULL")
    n = 0
    while time.time() < start:
        time.sleep(0.0005)
    while time.time() < stop:
        db.execute("INSERT INTO log (body) VALUES (?)", (_payload(proc, n),))
        n += 1
    db.close()
    out.put(n)


def _run_producers(target: Callable[..., None], where: str, procs: int, seconds: float) -> float:
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    start = time.time() + 0.5 + 0.02 * procs  # let every process get ready first
    workers = [
        ctx.Process(target=target, args=(where, i, start, start + seconds, out))
        for i in range(procs)
    ]
    for w in workers:
        w.start()
    total = sum(int(out.get(timeout=seconds + 60)) for _ in workers)
    for w in workers:
        w.join(30)
    return total / seconds


def bench_appends(root: str, seconds: float) -> list[dict[str, float]]:
    rows = []
    for procs in CONCURRENCY:
        wal_dir = os.path.join(root, f"wal-{procs}")
        Wal.open(wal_dir).close()  # create it (and its first preallocated segment) up front
        wal_rate = _run_producers(_wal_producer, wal_dir, procs, seconds)
        db_path = os.path.join(root, f"sqlite-{procs}.db")
        db = sqlite3.connect(db_path)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE log (id INTEGER PRIMARY KEY, body BLOB)")
        db.close()
        sqlite_rate = _run_producers(_sqlite_producer, db_path, procs, seconds)
        rows.append({"producers": procs, "walstore": wal_rate, "sqlite": sqlite_rate,
                     "ratio": wal_rate / sqlite_rate})  # fmt: skip
        shutil.rmtree(wal_dir)
    return rows


def build_log(directory: str, records: int) -> None:
    """Fill a log quickly (batches, no fsync per record) with ``records`` records."""
    opts = Options(sync=SyncPolicy.NONE)
    with Wal.open(directory, opts) as wal:
        batch = [_payload(0, i) for i in range(1000)]
        for _ in range(records // 1000):
            wal.append_batch(batch)


def _read_all(directory: str, out: Any) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    wal = Wal.open(directory)
    opened = time.perf_counter() - t0
    t0 = time.perf_counter()
    count = sum(1 for _ in wal.iter_from(wal.first_lsn()))
    read = time.perf_counter() - t0
    wal.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out.put({"open_s": opened, "read_s": read, "records": count, "rss_growth_kib": peak - before})


def measure_log(directory: str) -> dict[str, float]:
    """Open + read in a fresh child, so RSS growth is that of this log only."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=_read_all, args=(directory, out))
    child.start()
    result: dict[str, float] = out.get(timeout=600)
    child.join(30)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per append case")
    parser.add_argument("--records", type=int, default=1_000_000, help="log size for reads")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--dir", help="where to put the logs (default: a temp dir in ./var)")
    args = parser.parse_args(argv)
    os.makedirs("var", exist_ok=True)
    root = tempfile.mkdtemp(prefix="bench-wal-", dir=args.dir or "var")
    try:
        appends = bench_appends(root, args.seconds)
        small, big = os.path.join(root, "small"), os.path.join(root, "big")
        build_log(small, args.records // 10)
        build_log(big, args.records)
        small_m, big_m = measure_log(small), measure_log(big)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report = {"appends": appends, "small_log": small_m, "big_log": big_m}
    _print(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


def _print(report: dict[str, Any]) -> None:
    print("durable appends/s (256 B records, fsync per acknowledged append)")
    print(f"{'producers':>9} {'walstore':>10} {'sqlite':>10} {'ratio':>7}")
    for row in report["appends"]:
        print(f"{row['producers']:>9} {row['walstore']:>10.0f} {row['sqlite']:>10.0f} "
              f"{row['ratio']:>6.1f}x")  # fmt: skip
    for name in ("small_log", "big_log"):
        m = report[name]
        print(f"{name}: {m['records']} records: open {m['open_s'] * 1000:.0f} ms, "
              f"read {m['records'] / m['read_s'] / 1e6:.2f} M records/s, "
              f"peak RSS growth {m['rss_growth_kib'] / 1024:.1f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
