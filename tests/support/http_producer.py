"""A web client for the multi-host test: POSTs purchases to a host's web app at a steady
rate until SIGTERM (or its time bound), like the shop's customers.

    python tests/support/http_producer.py JOURNAL PREFIX URL RATE [MAX_SECONDS]

Its journal has the format of tests/support/fault_producer.py: ``try ID`` before each
request, ``ok ID LSN AT LATENCY`` once the app answered 201 (the purchase is durable),
``err ID REASON`` otherwise; each line one write on an O_APPEND file.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request


def post(url: str, purchase_id: str, n: int) -> tuple[int, dict[str, object]]:
    body = {"purchase_id": purchase_id, "customer": f"customer {n % 97}",
            "items": [{"sku": f"sku-{n % 13}", "qty": 1 + n % 3}],
            "total_cents": 100 + n % 5000, "currency": "EUR"}  # fmt: skip
    request = urllib.request.Request(
        f"{url}/purchases", data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {}


def main() -> int:
    journal, prefix, url, rate = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    max_seconds = float(sys.argv[5]) if len(sys.argv) > 5 else 300.0
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: stopping.append(signum))
    fd = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    deadline = time.monotonic() + max_seconds
    n = 0
    while not stopping and time.monotonic() < deadline:
        pid = f"{prefix}-{n}"
        os.write(fd, f"try {pid}\n".encode())
        started = time.monotonic()
        try:
            status, answer = post(url, pid, n)
        except OSError as exc:  # the app unreachable: say so, go on
            status, answer = 0, {"error": repr(exc)}
        done = time.monotonic()
        if status == 201:
            os.write(fd, f"ok {pid} {answer['lsn']} {done:.6f} {done - started:.6f}\n".encode())
        else:
            os.write(fd, f"err {pid} HTTP-{status}:{answer}\n".encode())
        n += 1
        pause = started + 1.0 / rate - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
