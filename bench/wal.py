"""walstore benchmark: durable appends against their physical limit, reading, open, memory.

    python -m bench.wal [--seconds 3] [--reps 5] [--records 1000000] [--json out.json]

This machine class is noisy (the same case can differ by 40% twenty minutes apart), so
every figure is measured in the same run as its baseline, repetitions are interleaved
(repetition 1 of every case, then repetition 2, ...), and the goals are checked on the
ratio of each repetition, reported as median and range.

Rows (256-byte records; every append durable before the next one starts):
- raw-1: one process pwrite + fdatasync into its own pre-zeroed file: the disk's limit
  for one writer.
- raw-16: sixteen such processes, each on its own file (total appends/s).
- floor-1: the least a log appended to from Python must do, in one process: take an
  exclusive lock (flock), frame and checksum the record (walstore's ``pack_record``),
  pwrite, fdatasync, unlock; no shared state, no recovery of a dead writer. What the
  language leaves of raw-1, against which walstore-1's own bookkeeping shows.
- walstore-1 / walstore-16: producers appending to one WAL (fsync policy always).
- sqlite-1 / sqlite-16: one and sixteen processes inserting one row per commit into one
  SQLite database (WAL mode, synchronous=FULL).
- purchase-16: sixteen processes calling the example's producer API, ``record_purchase``
  (``relay.send`` of the warehouse and finance tasks with the purchase id as idempotency
  key), on one WAL: what a web app gets, against walstore-16's raw ``Wal.append``.
- keyed-16, unkeyed-16 (no goal): where purchase-16's time goes. ``relay.send`` of the
  same two tasks without the example's validation, keyed by purchase id as
  ``record_purchase`` sends them (keyed-16), and without a key, so with no idempotency
  index (unkeyed-16). purchase-16 / keyed-16 is the validation's share, keyed-16 /
  unkeyed-16 the index's, unkeyed-16 / walstore-16 that of Celery's signatures, routing
  and the record's JSON.
- cpu/append: every producer's user+sys time over the appends (walstore-16 is the goal).
- CPU budget: for each goal at sixteen producers, the CPU per append that would let it
  be met with every core of this machine busy all the time (cores / (goal x baseline
  rate)), next to what the case spends: a case above its budget cannot meet the goal
  on this machine however its flushes are scheduled.
- open: ``Wal.open`` of a log of ``--records`` records (recovery: headers and the newest
  segment only), in a fresh process.
- iteration: ``Wal.iter_from`` over that log, against a bare Python loop that reads the
  same segment files and checks each record's CRC32C (same process; per repetition the
  best of three alternating passes of each).
- memory: peak RSS growth of a process that only opens and reads the whole log, at a
  tenth of ``--records`` and at all of it: flat means it does not grow with the log.
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import json
import multiprocessing as mp
import os
import resource
import shutil
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import crc32c

from walstore import Options, SyncPolicy, Wal
from walstore.format import RECORD_HEADER, SEGMENT_HEADER_SIZE, pack_record, unpack_segment_header

RECORD = 256
RAW_FILE_BYTES = 8 << 20  # each raw writer's pre-zeroed file (written round and round)
GOALS = (  # (name, ratio of, to, minimum) - or a maximum for cpu and open
    ("walstore-16 / raw-16", "walstore-16", "raw-16", 2.0),
    ("walstore-16 / sqlite-16", "walstore-16", "sqlite-16", 4.0),
    ("walstore-1 / raw-1", "walstore-1", "raw-1", 0.9),
    ("purchase-16 / walstore-16", "purchase-16", "walstore-16", 0.8),
)
CPU_GOAL_US = 60.0
READY_TIMEOUT_S = 120.0
OPEN_GOAL_S = 0.5
ITER_GOAL = 0.7


def _payload(proc: int, n: int) -> bytes:
    doc = json.dumps({"purchase_id": f"p{proc}-{n}", "customer": "bench", "total_cents": n})
    return doc.encode().ljust(RECORD - 1, b" ") + b"\n"


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


class Gate:
    """The start barrier: every producer readies itself (opens its log, imports, warms
    up) off the clock, then all start at one instant and stop at another, set by the
    parent once the last one is ready (a guessed head start let slow starters eat into
    the measured window: sixteen children importing the example app took longer than it)."""

    def __init__(self, ctx: Any, parties: int) -> None:
        self._parties = parties
        self._ready = ctx.Semaphore(0)
        self._go = ctx.Event()
        self._window = ctx.Array("d", 2)

    def wait(self) -> tuple[float, float]:
        """In a producer: say ready, then wait for the window; returns (start, stop)."""
        self._ready.release()
        if not self._go.wait(READY_TIMEOUT_S):
            raise TimeoutError("the benchmark never started")
        start, stop = self._window[:]
        while time.time() < start:
            time.sleep(0.0005)
        return start, stop

    def open(self, seconds: float) -> None:
        """In the parent: once every producer is ready, set the window and let them go."""
        for _ in range(self._parties):
            if not self._ready.acquire(timeout=READY_TIMEOUT_S):
                raise TimeoutError("a producer never got ready")
        start = time.time() + 0.05
        self._window[:] = [start, start + seconds]
        self._go.set()


def _raw_writer(path: str, proc: int, gate: Gate, out: Any) -> None:
    fd = os.open(path, os.O_RDWR)
    n, off = 0, 0
    _start, stop = gate.wait()
    cpu = _cpu()
    while time.time() < stop:
        os.pwrite(fd, _payload(proc, n), off)
        os.fdatasync(fd)
        n += 1
        off = (off + RECORD) % RAW_FILE_BYTES
    out.put((n, _cpu() - cpu))
    os.close(fd)


def _floor_writer(path: str, proc: int, gate: Gate, out: Any) -> None:
    fd = os.open(path, os.O_RDWR)
    lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    n, off = 0, 0
    _start, stop = gate.wait()
    cpu = _cpu()
    while time.time() < stop:
        fcntl.flock(lock, fcntl.LOCK_EX)
        record = pack_record(1, n, _payload(proc, n))
        os.pwrite(fd, record, off)
        os.fdatasync(fd)
        fcntl.flock(lock, fcntl.LOCK_UN)
        n += 1
        off = (off + len(record)) % (RAW_FILE_BYTES - len(record))
    out.put((n, _cpu() - cpu))
    os.close(lock)
    os.close(fd)


def _wal_producer(directory: str, proc: int, gate: Gate, out: Any) -> None:
    wal = Wal.open(directory)
    n = 0
    _start, stop = gate.wait()
    cpu = _cpu()
    while time.time() < stop:
        wal.append(_payload(proc, n))
        n += 1
    out.put((n, _cpu() - cpu))
    wal.close()


def _purchase(proc: int, n: int) -> dict[str, Any]:
    return {"purchase_id": f"b{proc}-{n}", "customer": "bench", "currency": "EUR",
            "items": [{"sku": "sku-1", "qty": 1}], "total_cents": n + 2}  # fmt: skip


def _warm_then_timed(gate: Gate, out: Any, step: Callable[[int], object]) -> None:
    """``step(-1)`` off the clock (opens the log and the key index), then ``step(n)`` for
    n = 0, 1, ... through the gate's window."""
    step(-1)
    n = 0
    _start, stop = gate.wait()
    cpu = _cpu()
    while time.time() < stop:
        step(n)
        n += 1
    out.put((n, _cpu() - cpu))


def _purchase_producer(directory: str, proc: int, gate: Gate, out: Any) -> None:
    from tasks.checkout import record_purchase  # imported by the parent

    _warm_then_timed(gate, out, lambda n: record_purchase(_purchase(proc, n)))


def _send_producer(directory: str, proc: int, gate: Gate, out: Any, keyed: bool) -> None:
    """``relay.send`` of the purchase's two tasks, as ``record_purchase`` sends them but
    without its validation; keyed by purchase id or not at all."""
    from tasks.app import get_app
    from tasks.finance import record_revenue
    from tasks.warehouse import reserve_stock

    relay = get_app().relay

    def send(n: int) -> None:
        clean = _purchase(proc, n)
        key = clean["purchase_id"] if keyed else None
        relay.send(reserve_stock.s(clean), record_revenue.s(clean), key=key)

    _warm_then_timed(gate, out, send)


def _sqlite_producer(path: str, proc: int, gate: Gate, out: Any) -> None:
    db = sqlite3.connect(path, timeout=60, isolation_level=None)
    db.execute("PRAGMA synchronous=FULL")
    n = 0
    _start, stop = gate.wait()
    cpu = _cpu()
    while time.time() < stop:
        db.execute("INSERT INTO log (body) VALUES (?)", (_payload(proc, n),))
        n += 1
    out.put((n, _cpu() - cpu))
    db.close()


def _producers(target: Callable[..., None], wheres: list[str], seconds: float) -> dict[str, float]:
    """Run one process per ``wheres`` entry for ``seconds``: appends/s and CPU/append."""
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    gate = Gate(ctx, len(wheres))
    procs = [
        ctx.Process(target=target, args=(where, i, gate, out)) for i, where in enumerate(wheres)
    ]
    for p in procs:
        p.start()
    gate.open(seconds)
    results = [out.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join(60)
    appends = sum(n for n, _ in results)
    cpu = sum(c for _, c in results)
    return {"rate": appends / seconds, "cpu_us": cpu / max(appends, 1) * 1e6}


def _case(name: str, root: str, seconds: float) -> dict[str, float]:
    kind, procs = name.rsplit("-", 1)
    n = int(procs)
    where = os.path.join(root, name)
    os.makedirs(where)
    try:
        if kind in ("raw", "floor"):
            paths = [os.path.join(where, f"raw{i}") for i in range(n)]
            for path in paths:  # pre-zeroed and durable, so fdatasync needs no metadata
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
                os.pwrite(fd, bytes(RAW_FILE_BYTES), 0)
                os.fsync(fd)
                os.close(fd)
            return _producers(_raw_writer if kind == "raw" else _floor_writer, paths, seconds)
        if kind == "walstore":
            wal_dir = os.path.join(where, "wal")
            Wal.open(wal_dir).close()  # the first (preallocated) segment exists up front
            return _producers(_wal_producer, [wal_dir] * n, seconds)
        if kind in ("purchase", "keyed", "unkeyed"):
            # The example app reads WAL_DIR once, when it is made (here, before the first
            # of these cases): every case of the producer API logs to this directory,
            # removed after each. Celery and the app are imported here too, not by
            # sixteen children at the barrier.
            wal_dir = os.path.join(root, "api-wal")
            os.environ["WAL_DIR"] = wal_dir
            import tasks.checkout  # noqa: F401
            from tasks.app import get_app

            if os.path.realpath(get_app().relay.wal_dir) != os.path.realpath(wal_dir):
                raise RuntimeError("the example app was made for another WAL_DIR")
            Wal.open(wal_dir).close()
            producers: dict[str, Callable[..., None]] = {
                "purchase": _purchase_producer,
                "keyed": functools.partial(_send_producer, keyed=True),
                "unkeyed": functools.partial(_send_producer, keyed=False),
            }
            producer = producers[kind]
            try:
                return _producers(producer, [wal_dir] * n, seconds)
            finally:
                shutil.rmtree(wal_dir, ignore_errors=True)
        db_path = os.path.join(where, "log.db")
        db = sqlite3.connect(db_path)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE log (id INTEGER PRIMARY KEY, body BLOB)")
        db.close()
        return _producers(_sqlite_producer, [db_path] * n, seconds)
    finally:
        shutil.rmtree(where, ignore_errors=True)


CASES = ("raw-1", "floor-1", "walstore-1", "sqlite-1", "raw-16", "walstore-16", "sqlite-16",
         "purchase-16", "keyed-16", "unkeyed-16")  # fmt: skip


# ----------------------------------------------------------------- reading
def build_log(directory: str, records: int) -> None:
    """Fill a log quickly (batches, no fsync per record) with ``records`` records."""
    with Wal.open(directory, Options(sync=SyncPolicy.NONE)) as wal:
        batch = [_payload(0, i) for i in range(1000)]
        for _ in range(records // 1000):
            wal.append_batch(batch)
        if records % 1000:
            wal.append_batch(batch[: records % 1000])


def bare_loop(directory: str, chunk: int = 1 << 20) -> int:
    """The floor for iteration: read each segment and check each record's CRC32C. Read in
    chunks up to its last record, as the log reads: a newest segment is mostly its
    preallocated zeros, which a read of the whole file would copy (at 20,000 records, 42 of
    the loop's 50 ms) and the log never reads."""
    count = 0
    unpack, crc = RECORD_HEADER.unpack_from, crc32c.crc32c
    for name in sorted(n for n in os.listdir(directory) if n.endswith(".seg")):
        with open(os.path.join(directory, name), "rb", buffering=0) as f:
            salt = unpack_segment_header(f.read(SEGMENT_HEADER_SIZE)).salt
            buf, pos, done = b"", 0, False
            while not done and (more := f.read(chunk)):
                buf, pos = buf[pos:] + more, 0  # a record cut by the chunk: its start kept
                view, size = memoryview(buf), len(buf)
                while pos + 20 <= size:
                    stored, length, _lsn, rtype = unpack(buf, pos)
                    if rtype == 0:
                        done = True
                        break
                    end = pos + 20 + length
                    if end > size:
                        break  # the rest comes with the next chunk
                    if crc(view[pos + 4 : end], salt) != stored:
                        raise ValueError("bad record")
                    count += 1
                    pos = end
                view.release()
    return count


def _read_log(directory: str, out: Any) -> None:
    """Open and iterate the whole log, nothing else: the RSS growth is the log's."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with Wal.open(directory) as wal:
        count = sum(1 for _ in wal.iter_from(wal.first_lsn()))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out.put({"records": count, "rss_growth_kib": peak - before})


def _iterate_vs_bare(directory: str, reps: int, out: Any) -> None:
    reads, bares = [], []
    with Wal.open(directory) as wal:
        for _ in range(reps):
            # Three alternating passes each, the best of each kept: a pass that another
            # tenant of the machine slowed down says nothing about either loop.
            read_s = bare_s = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                count = sum(1 for _ in wal.iter_from(wal.first_lsn()))
                read_s = min(read_s, time.perf_counter() - t0)
                t0 = time.perf_counter()
                assert bare_loop(directory) == count
                bare_s = min(bare_s, time.perf_counter() - t0)
            reads.append(count / read_s)
            bares.append(count / bare_s)
    out.put({"read": reads, "bare": bares})


def _in_child(target: Callable[..., None], *args: Any) -> dict[str, Any]:
    """Run ``target(*args, queue)`` in a fresh process (nothing inherited in memory)."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=target, args=(*args, out))
    child.start()
    result: dict[str, Any] = out.get(timeout=1800)
    child.join(60)
    return result


def _open_time(directory: str, out: Any) -> None:
    t0 = time.perf_counter()
    Wal.open(directory).close()
    out.put(time.perf_counter() - t0)


def open_times(directory: str, reps: int) -> list[float]:
    ctx = mp.get_context("spawn")
    times = []
    for _ in range(reps):
        out = ctx.Queue()
        child = ctx.Process(target=_open_time, args=(directory, out))
        child.start()
        times.append(float(out.get(timeout=600)))
        child.join(60)
    return times


# ----------------------------------------------------------------- report
def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per append case")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions")
    parser.add_argument("--records", type=int, default=1_000_000, help="log size for reads")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--dir", help="where to put the logs (default: a temp dir in ./var)")
    args = parser.parse_args(argv)
    if args.records < 10:
        parser.error("--records: at least 10 (the memory case reads a tenth of them)")
    os.makedirs("var", exist_ok=True)
    root = tempfile.mkdtemp(prefix="bench-wal-", dir=args.dir or "var")
    runs: dict[str, list[dict[str, float]]] = {case: [] for case in CASES}
    try:
        for rep in range(args.reps):
            for case in CASES:
                runs[case].append(_case(case, root, args.seconds))
                print(f"rep {rep + 1}/{args.reps} {case:<12} {runs[case][-1]['rate']:>8.0f}/s "
                      f"{runs[case][-1]['cpu_us']:>6.0f} us cpu/append", flush=True)  # fmt: skip
        small, big = os.path.join(root, "small"), os.path.join(root, "big")
        build_log(small, args.records // 10)
        build_log(big, args.records)
        opens = open_times(big, args.reps)
        small_m, big_m = _in_child(_read_log, small), _in_child(_read_log, big)
        big_m.update(_in_child(_iterate_vs_bare, big, args.reps))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report = _report(runs, opens, small_m, big_m, args)
    _print(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


def _report(
    runs: dict[str, list[dict[str, float]]],
    opens: list[float],
    small: dict[str, Any],
    big: dict[str, Any],
    args: argparse.Namespace,
) -> dict[str, Any]:
    rates = {c: [r["rate"] for r in runs[c]] for c in CASES}
    goals = []
    for name, num, den, minimum in GOALS:
        ratios = _ratios(rates, num, den)
        goals.append({"goal": f"{name} >= {minimum}", **summary(ratios), "ok": None})
    cpu = [r["cpu_us"] for r in runs["walstore-16"]]
    goals.append({"goal": f"cpu/append at 16 producers <= {CPU_GOAL_US:.0f} us", **summary(cpu)})
    goals.append({"goal": f"open {big['records']} records < {OPEN_GOAL_S} s", **summary(opens)})
    iters = [a / b for a, b in zip(big["read"], big["bare"], strict=True)]
    goals.append({"goal": f"iteration / bare loop >= {ITER_GOAL}", **summary(iters)})
    for g, ok in zip(goals, _goal_checks(goals), strict=True):
        g["ok"] = ok
    cores = os.cpu_count() or 1
    budgets = []
    for name, num, den, minimum in GOALS:
        if not num.endswith("-16"):
            continue
        allowed = [cores * 1e6 / (minimum * b) for b in rates[den]]
        spent = [r["cpu_us"] for r in runs[num]]
        budgets.append({"goal": f"{name} >= {minimum}", "case": num, "cores": cores,
                        "budget_us": summary(allowed), "spent_us": summary(spent)})  # fmt: skip
    return {
        "args": {"seconds": args.seconds, "reps": args.reps, "records": args.records},
        "cases": {
            c: {
                "rate": summary(rates[c]),
                "cpu_us": summary([r["cpu_us"] for r in runs[c]]),
                "runs": runs[c],
            }
            for c in CASES
        },
        "goals": goals,
        "cpu_budgets": budgets,
        "floor": {
            "floor-1 / raw-1": summary(_ratios(rates, "floor-1", "raw-1")),
            "walstore-1 / floor-1": summary(_ratios(rates, "walstore-1", "floor-1")),
            "purchase-16 / keyed-16": summary(_ratios(rates, "purchase-16", "keyed-16")),
            "keyed-16 / unkeyed-16": summary(_ratios(rates, "keyed-16", "unkeyed-16")),
            "unkeyed-16 / walstore-16": summary(_ratios(rates, "unkeyed-16", "walstore-16")),
        },
        "read": {"records_per_s": summary(big["read"]), "bare_per_s": summary(big["bare"])},
        "memory_kib": {"tenth": small["rss_growth_kib"], "full": big["rss_growth_kib"]},
    }


def _ratios(rates: dict[str, list[float]], num: str, den: str) -> list[float]:
    return [a / b for a, b in zip(rates[num], rates[den], strict=True)]


def _goal_checks(goals: list[dict[str, Any]]) -> list[bool]:
    """Judged on the median; the range is printed next to it."""
    out = []
    for g in goals:
        if "cpu" in g["goal"] or g["goal"].startswith("open"):
            out.append(g["median"] <= float(g["goal"].split()[-2]))
        else:
            out.append(g["median"] >= float(g["goal"].split()[-1]))
    return out


def _print(report: dict[str, Any]) -> None:
    args = report["args"]
    print(f"\ndurable appends/s, 256-byte records, {args['reps']} interleaved repetitions "
          f"of {args['seconds']:.0f} s: median (min-max)")  # fmt: skip
    print(f"{'case':<12} {'appends/s':>24} {'cpu us/append':>22}")
    for case, c in report["cases"].items():
        r, u = c["rate"], c["cpu_us"]
        print(f"{case:<12} {r['median']:>9.0f} ({r['min']:>6.0f}-{r['max']:<6.0f}) "
              f"{u['median']:>7.0f} ({u['min']:>4.0f}-{u['max']:<4.0f})")  # fmt: skip
    print("\ngoals (per-repetition ratios, same run): median (min-max)")
    for g in report["goals"]:
        print(f"  {'MET ' if g['ok'] else 'MISS'} {g['goal']:<42} {g['median']:>8.2f} "
              f"({g['min']:.2f}-{g['max']:.2f})")  # fmt: skip
    for name, f in report["floor"].items():
        print(f"  info {name:<42} {f['median']:>8.2f} ({f['min']:.2f}-{f['max']:.2f})")
    print("\nCPU per append each goal leaves with every core busy, against what it takes: "
          "median (min-max)")  # fmt: skip
    for b in report["cpu_budgets"]:
        a, t = b["budget_us"], b["spent_us"]
        print(f"  {b['goal']:<32} budget {a['median']:>5.0f} us ({a['min']:.0f}-{a['max']:.0f}) "
              f"on {b['cores']} cores; {b['case']} takes {t['median']:>5.0f} us "
              f"({t['min']:.0f}-{t['max']:.0f})")  # fmt: skip
    rd, mem = report["read"], report["memory_kib"]
    print(f"\niteration {rd['records_per_s']['median'] / 1e6:.2f} M records/s, bare loop "
          f"{rd['bare_per_s']['median'] / 1e6:.2f} M records/s (medians)")  # fmt: skip
    print(f"peak RSS growth reading the whole log: {mem['tenth'] / 1024:.1f} MiB at a tenth, "
          f"{mem['full'] / 1024:.1f} MiB at full size")  # fmt: skip


if __name__ == "__main__":
    main()
