"""Producer processes for the chaos command. Each records purchases at a steady rate with
``record_purchase`` and writes down, per purchase, what it was about to do and what it
was told; ``ProducerPool`` starts them in a ``LocalStack``, replaces killed ones and reads
their journals.

    python -m tools.loadgen --prefix p1x0 --rate 25 --until EPOCH --journal FILE

The journal gets ``try ID`` before the append and ``ok ID LSN`` once the append returned
(``err ID reason`` when it raised), each line one ``write`` on an O_APPEND file, so a
kill -9 at any moment leaves whole lines and at most one ``try`` without its answer. The
auditor counts a purchase as acknowledged only after its ``ok`` line: what the caller of
``record_purchase`` was told.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.checkout import record_purchase
from tools.localstack import LocalStack
from tools.processes import Proc, kill_busy, wait_until
from walstore import WalError


def purchase(purchase_id: str, n: int) -> dict[str, Any]:
    """A valid purchase, varied by ``n`` (deterministic: the same id, the same purchase)."""
    return {
        "purchase_id": purchase_id,
        "customer": f"customer {n % 97}",
        "items": [{"sku": f"sku-{n % 13}", "qty": 1 + n % 3}],
        "total_cents": 100 + n % 5000,
        "currency": "EUR",
    }


def run(prefix: str, rate: float, until: float, journal: str) -> int:
    """Record purchases ``PREFIX-0``, ``PREFIX-1``, ... until the wall clock passes
    ``until``; returns how many were acknowledged."""
    fd = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    started, acked, n = time.monotonic(), 0, 0
    try:
        while time.time() < until:
            pause = started + n / rate - time.monotonic()
            if pause > 0:
                time.sleep(min(pause, max(until - time.time(), 0)))
                continue
            pid = f"{prefix}-{n}"
            os.write(fd, f"try {pid}\n".encode())
            try:
                receipt = record_purchase(purchase(pid, n))
            except WalError as exc:  # log full or failed: the caller is told no
                os.write(fd, f"err {pid} {type(exc).__name__}\n".encode())
                time.sleep(0.5)
            else:
                os.write(fd, f"ok {pid} {receipt.lsn}\n".encode())
                acked += 1
            n += 1
    finally:
        os.close(fd)
    return acked


@dataclass
class ProducerPool:
    """``count`` producer processes sharing ``rate`` purchases/s until epoch ``until``.

    Producer ``i`` writes ``journals/producer-i.log``; each start of it gets a new id
    prefix (``p<i>x<generation>``), so a killed producer's successor never reuses an id."""

    stack: LocalStack
    count: int
    rate: float
    until: float
    procs: list[Proc] = field(default_factory=list)
    generations: list[int] = field(default_factory=list)

    @property
    def journals(self) -> Path:
        return self.stack.workdir / "journals"

    def start(self) -> None:
        self.journals.mkdir(parents=True, exist_ok=True)
        self.generations = [0] * self.count
        self.procs = [self._spawn(i) for i in range(self.count)]

    def _spawn(self, index: int) -> Proc:
        prefix = f"p{index + 1}x{self.generations[index]}"
        argv = [sys.executable, "-m", "tools.loadgen", "--prefix", prefix,
                "--rate", f"{self.rate / self.count:.3f}", "--until", f"{self.until:.3f}",
                "--journal", str(self.journals / f"producer-{index + 1}.log")]  # fmt: skip
        return self.stack.spawn(f"producer{index + 1}", argv)

    def replace_busy(self, index: int) -> str:
        index %= self.count
        proc = self.procs[index]
        note = kill_busy([proc.pid] if proc.alive else [])
        proc.stop(signal.SIGKILL)  # reap it
        if time.time() < self.until:
            self.generations[index] += 1
            self.procs[index] = self._spawn(index)
        return f"producer{index + 1} {note}"

    def wait(self, timeout: float) -> None:
        """Until every producer has exited (they stop by themselves at ``until``)."""
        wait_until("the producers to finish", lambda: not any(p.alive for p in self.procs),
                   timeout, 0.1)  # fmt: skip

    def journal(self) -> tuple[set[str], set[str]]:
        """(attempted, acknowledged) purchase ids, from whole lines of every journal."""
        attempted: set[str] = set()
        acked: set[str] = set()
        for path in sorted(self.journals.glob("producer-*.log")):
            text = path.read_text(errors="replace")
            for line in text[: text.rfind("\n") + 1].splitlines():
                kind, _, rest = line.partition(" ")
                pid = rest.split(" ", 1)[0]
                if kind == "try":
                    attempted.add(pid)
                elif kind == "ok":
                    acked.add(pid)
        return attempted, acked


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.loadgen", description=__doc__)
    parser.add_argument("--prefix", required=True, help="purchase ids are PREFIX-N")
    parser.add_argument("--rate", type=float, default=25.0, help="purchases per second")
    parser.add_argument("--until", type=float, required=True, help="stop at this epoch time")
    parser.add_argument("--journal", required=True, help="file to append try/ok lines to")
    args = parser.parse_args(argv)
    if args.rate <= 0:
        parser.error("--rate must be positive")
    run(args.prefix, args.rate, args.until, args.journal)


if __name__ == "__main__":
    main()
