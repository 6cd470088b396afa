"""``python -m bench`` (``make bench``): every benchmark, each against its baseline in the
same run. ``python -m bench.wal``, ``python -m bench.ceiling`` and ``python -m
bench.pipeline`` run one of them."""

from __future__ import annotations

import sys

from . import ceiling, pipeline, wal


def main() -> int:
    print("== walstore: durable appends vs SQLite, reads, open, memory ==", flush=True)
    wal.main([])
    print("\n== the ceiling: walstore's group commit compiled, vs raw writers ==", flush=True)
    ceiling.main([])
    print("\n== pipeline: pump relay and end to end vs .delay(), latency ==", flush=True)
    return pipeline.main([])


if __name__ == "__main__":
    sys.exit(main())
