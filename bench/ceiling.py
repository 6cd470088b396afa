"""What group commit could reach on this machine without Python: the ceiling.

    python -m bench.ceiling [--seconds 3] [--reps 5] [--json out.json]

bench.wal's goals at sixteen producers ask for more CPU per append than walstore's Python
leaves on this two-core class (see its CPU budgets). This measures, in one run and with
the repetitions interleaved, what the same protocol gives when compiled: a C program
(``bench/ceiling/group_commit.c``, built here with the machine's ``cc``) doing what
walstore's group commit does (slots in a shared mapping, one leader that frames every
ready slot with a CRC32C, one pwrite and one fdatasync, one futex broadcast), next to
bench.wal's own raw and walstore cases:

- raw-1, raw-16, walstore-1, walstore-16: bench.wal's cases (Python).
- c-raw-1, c-raw-16: bench.wal's raw writers, in C.
- c-group-1, c-group-16: the group commit in C, with walstore's gather (up to two sleeps
  of 100 us for as many producers as the last flush wrote).
- c-group-16-poll: the same with a gather of up to ten sleeps of 10 us.
- c-group-16-poll-work: the same, each producer first burning 5 us of CPU per append: a
  stand-in for the Python of a caller of a compiled append (bench.wal's producer loop,
  its payload and clock, costs 2.7 us per append on hot caches, outside walstore, and a
  process that slept through an fdatasync runs on cold ones).

Not product code and not a goal of its own: a measurement for the choice of a compiled
append path (what it would buy, against the goals bench.wal checks). Needs a C compiler;
without one it says so and measures nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from . import wal as walbench
from .wal import summary

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ceiling", "group_commit.c")
CASES = ("raw-1", "c-raw-1", "walstore-1", "c-group-1", "raw-16", "c-raw-16", "walstore-16",
         "c-group-16", "c-group-16-poll", "c-group-16-poll-work")  # fmt: skip
POLL = {"GATHER_NS": "10000", "GATHER_TRIES": "10"}
WORK = {"WORK_NS": "5000"}
RATIOS = (  # (name, numerator, denominator)
    ("walstore-16 / raw-16 (bench.wal's goal: >= 2.0)", "walstore-16", "raw-16"),
    ("c-group-16 / raw-16", "c-group-16", "raw-16"),
    ("c-group-16-poll / raw-16", "c-group-16-poll", "raw-16"),
    ("c-group-16-poll / c-raw-16", "c-group-16-poll", "c-raw-16"),
    ("c-group-16-poll-work / raw-16", "c-group-16-poll-work", "raw-16"),
    ("walstore-1 / raw-1 (bench.wal's goal: >= 0.9)", "walstore-1", "raw-1"),
    ("c-group-1 / raw-1", "c-group-1", "raw-1"),
    ("c-group-1 / c-raw-1", "c-group-1", "c-raw-1"),
)


def build(out_dir: str) -> str | None:
    """The compiled program, or None (and why, on stderr) if there is no compiler."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        print("bench.ceiling: no C compiler (cc, gcc or $CC): nothing measured", file=sys.stderr)
        return None
    binary = os.path.join(out_dir, "group_commit")
    flags = ["-O2", "-march=native"] if os.uname().machine == "x86_64" else ["-O2"]
    done = subprocess.run([cc, *flags, "-o", binary, SOURCE], capture_output=True, text=True)
    if done.returncode:
        print(f"bench.ceiling: {cc} failed:\n{done.stderr}", file=sys.stderr)
        return None
    return binary


def c_case(binary: str, name: str, root: str, seconds: float) -> dict[str, float]:
    parts = name.split("-")
    mode, procs = parts[1], parts[2]
    where = tempfile.mkdtemp(dir=root)
    env = {**os.environ, **(POLL if "-poll" in name else {}), **(WORK if "-work" in name else {})}
    try:
        command = [binary, mode, procs, str(seconds), where]
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, check=True, timeout=seconds + 120
        )
    finally:
        shutil.rmtree(where, ignore_errors=True)
    result: dict[str, float] = json.loads(done.stdout)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per case")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--dir", help="where to put the files (default: a temp dir in ./var)")
    args = parser.parse_args(argv)
    os.makedirs("var", exist_ok=True)
    root = tempfile.mkdtemp(prefix="bench-ceiling-", dir=args.dir or "var")
    runs: dict[str, list[dict[str, float]]] = {case: [] for case in CASES}
    try:
        binary = build(root)
        if binary is None:
            return None
        for rep in range(args.reps):
            for case in CASES:
                if case.startswith("c-"):
                    result = c_case(binary, case, root, args.seconds)
                else:
                    result = walbench._case(case, root, args.seconds)
                runs[case].append(result)
                print(f"rep {rep + 1}/{args.reps} {case:<16} {result['rate']:>8.0f}/s "
                      f"{result['cpu_us']:>6.1f} us cpu/append", flush=True)  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rates = {c: [r["rate"] for r in runs[c]] for c in CASES}
    cases = {
        c: {"rate": summary(rates[c]), "cpu_us": summary([r["cpu_us"] for r in runs[c]]),
            "runs": runs[c]}
        for c in CASES
    }  # fmt: skip
    ratios = {
        name: summary([a / b for a, b in zip(rates[num], rates[den], strict=True)])
        for name, num, den in RATIOS
    }
    report = {"args": {"seconds": args.seconds, "reps": args.reps}, "cases": cases,
              "ratios": ratios}  # fmt: skip
    print(f"\ndurable appends/s, 256-byte records, {args.reps} interleaved repetitions of "
          f"{args.seconds:g} s: median (min-max)")  # fmt: skip
    for case, c in report["cases"].items():
        r, u = c["rate"], c["cpu_us"]
        print(f"{case:<16} {r['median']:>8.0f} ({r['min']:>6.0f}-{r['max']:<6.0f}) "
              f"{u['median']:>6.1f} us cpu/append ({u['min']:.1f}-{u['max']:.1f})")  # fmt: skip
    print("\nratios (per repetition, same run): median (min-max)")
    for name, s in report["ratios"].items():
        print(f"  {name:<48} {s['median']:>5.2f} ({s['min']:.2f}-{s['max']:.2f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
