"""A producer process for the killed-appender test: appends until killed, and records
each acknowledged (lsn, tag) in its ack file *after* append returned."""

from __future__ import annotations

import os
import random
import sys

from walstore import Options, Wal


def main() -> None:
    directory, ack_path, ident, seg = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    rng = random.Random(f"{ident}-{os.getpid()}")
    wal = Wal.open(directory, Options(segment_bytes=seg, min_free_bytes=0))
    with open(ack_path, "a", buffering=1) as acks:
        for n in range(100_000):
            size = rng.choice((40, 200, 3000, 40_000))
            tags = [f"{ident}:{n}:{k}" for k in range(rng.choice((1, 1, 1, 4)))]
            payloads = [(t + "|").encode().ljust(size, b"x") for t in tags]
            lsns = wal.append_batch(payloads)
            for lsn, tag in zip(lsns, tags, strict=True):
                acks.write(f"{lsn} {tag}\n")


if __name__ == "__main__":
    main()
