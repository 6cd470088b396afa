"""The key index's own files removed or damaged (review of 2026-12-01).

- ``keys.sqlite3`` removed while a sender had it open: that sender kept writing to the
  removed file while new processes built a new index, so a key was appended twice.
- ``keys.lock`` removed while a sender had it open: a process started later locked
  another file, so two senders of one key no longer took turns and both appended.
- ``keys.sqlite3`` damaged: every keyed send failed with ``sqlite3.DatabaseError``,
  outside walrelay's error tree.
"""

from __future__ import annotations

import fcntl
import json
import multiprocessing as mp
import os
import sqlite3
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.walrelay.shop_app import app as shop
from tests.walrelay.shop_tasks import reserve
from tests.walrelay.test_relay_keys import ROOT, keyed, make, run_senders
from walrelay import KeyIndexError, Relay, RelayError, RelaySettings, keys
from walrelay.keys import DB_NAME, LOCK_NAME
from walstore import Options

pytestmark = pytest.mark.timeout(180)
KEYS = 200

MANY = """
import json, sys, time
from tests.walrelay.shop_app import app
from tests.walrelay.shop_tasks import reserve
from walrelay import Relay, RelaySettings
from walstore import Options
wal_dir, start_at, count = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
relay = Relay(app, wal_dir, settings=RelaySettings(wal_dir=wal_dir),
              wal_options=Options(segment_bytes=1 << 20))  # fsync per send: senders overlap
relay.send(reserve.s({"order": "ready"}), key="ready")  # its index is open before the race
while time.time() < start_at:
    time.sleep(0.001)
lsns = {f"m{i}": relay.send(reserve.s({"order": i}), key=f"m{i}").lsn for i in range(count)}
print(json.dumps(lsns))
"""


def _remove_db(wal_dir: Path) -> None:
    for name in (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm"):
        (wal_dir / name).unlink(missing_ok=True)


def test_the_index_removed_under_a_live_sender_is_not_written_past(tmp_path: Path) -> None:
    wal_dir = tmp_path / "wal"
    a = make(wal_dir)
    try:
        first = a.send(reserve.s({"order": "k1"}), key="k1")
        _remove_db(wal_dir)
        done = run_senders(wal_dir, [("k2", "send")])  # a new process: a new index
        assert done[0].returncode == 0, done[0].stderr
        lsn_b = json.loads(done[0].stdout)[0]
        assert a.send(reserve.s({"order": "k2"}), key="k2").lsn == lsn_b
        assert a.send(reserve.s({"order": "k1"}), key="k1").lsn == first.lsn
        assert Counter(keyed(a)) == {"k1": 1, "k2": 1}
    finally:
        a.close()


def test_the_lock_file_removed_under_a_live_sender_still_orders_senders(
    tmp_path: Path,
) -> None:
    wal_dir = tmp_path / "wal"
    a = Relay(shop, str(wal_dir), settings=RelaySettings(wal_dir=str(wal_dir)),
              wal_options=Options(segment_bytes=1 << 20))  # fmt: skip
    try:
        a.send(reserve.s({"order": "warm"}), key="warm")  # a has keys.lock open
        (wal_dir / LOCK_NAME).unlink()
        start_at = time.time() + 3.0
        b = subprocess.Popen(
            [sys.executable, "-c", MANY, str(wal_dir), str(start_at), str(KEYS)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        while time.time() < start_at:
            time.sleep(0.001)
        mine = {f"m{i}": a.send(reserve.s({"order": i}), key=f"m{i}").lsn for i in range(KEYS)}
        stdout, stderr = b.communicate(timeout=120)
        assert b.returncode == 0, stderr
        theirs = json.loads(stdout)
        assert mine == theirs  # one receipt per key, whoever sent it first
        counts = Counter(keyed(a))
        assert [k for k, n in counts.items() if n > 1] == []
        assert len(counts) == KEYS + 2
    finally:
        a.close()


def test_a_damaged_index_is_a_relay_error_and_heals_once_removed(tmp_path: Path) -> None:
    wal_dir = tmp_path / "wal"
    a = make(wal_dir)
    first = a.send(reserve.s({"order": "k1"}), key="k1")
    a.close()
    with open(wal_dir / DB_NAME, "r+b") as f:
        f.write(b"\x5a" * 100)  # no longer an SQLite file
    b = make(wal_dir)
    try:
        for _ in range(2):  # and again: nothing is half-open after the first failure
            with pytest.raises(KeyIndexError, match=DB_NAME) as caught:
                b.send(reserve.s({"order": "k1"}), key="k1")
            assert isinstance(caught.value, RelayError)
            assert "remove" in str(caught.value)
        assert b.send(reserve.s({"order": "unkeyed"})).lsn == first.lsn + 1  # unkeyed: fine
        _remove_db(wal_dir)  # the repair the error names
        assert b.send(reserve.s({"order": "k1"}), key="k1").lsn == first.lsn  # from the log
        assert keyed(b).count("k1") == 1
    finally:
        b.close()
    assert os.path.exists(wal_dir / DB_NAME)


# ------------------------------------------------------------------ second review
def _stripe_lock(fd: int, start: int, kind: int = fcntl.F_WRLCK) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, struct.pack("hhqqi4x", kind, 0, start, 1, 0))


def _queue_sender(wal_dir: str, cmds: Any, out: Any) -> None:
    relay = make(Path(wal_dir))
    while (key := cmds.get()) is not None:
        out.put((key, relay.send(reserve.s({"order": "same"}), key=key).lsn))
    relay.close()


@pytest.mark.skipif(not hasattr(fcntl, "F_OFD_SETLKW"), reason="Linux's OFD locks")
def test_a_sender_waiting_for_its_stripe_on_a_removed_lock_file_does_not_go_on(
    tmp_path: Path,
) -> None:
    """A passed the check, then waited for K's stripe (held by a third sender) on the
    keys.lock that was removed meanwhile; B re-opened on the new keys.lock: both held
    "the" stripe of K and both appended K."""
    wal_dir = str(tmp_path / "wal")
    ctx = mp.get_context("fork")
    qa, qb, out = ctx.Queue(), ctx.Queue(), ctx.Queue()
    senders = [ctx.Process(target=_queue_sender, args=(wal_dir, q, out)) for q in (qa, qb)]
    for p in senders:
        p.start()
    try:
        qa.put("warm-a")
        out.get(timeout=30)
        qb.put("warm-b")
        out.get(timeout=30)
        stripe = zlib.crc32(b"K") % keys.STRIPES * keys._SLOT.size
        path = os.path.join(wal_dir, LOCK_NAME)
        old = os.open(path, os.O_RDWR)
        _stripe_lock(old, stripe)  # a third sender of K, mid-send
        qa.put("K")
        time.sleep(0.5)  # A waits for the stripe
        os.remove(path)
        qb.put("other")
        out.get(timeout=30)  # B re-opened on a new keys.lock
        new = os.open(path, os.O_RDWR)
        _stripe_lock(new, keys._WRITER)  # B stays between its append and its insert a while
        qb.put("K")
        time.sleep(0.5)
        _stripe_lock(old, stripe, fcntl.F_UNLCK)  # the third sender is done: A goes on
        time.sleep(0.5)
        _stripe_lock(new, keys._WRITER, fcntl.F_UNLCK)
        got = dict(out.get(timeout=30) for _ in range(2))
        os.close(old)
        os.close(new)
    finally:
        for q in (qa, qb):
            q.put(None)
        for p in senders:
            p.join(30)
    r = make(Path(wal_dir))
    try:
        assert keyed(r).count("K") == 1
    finally:
        r.close()
    assert got["K"] >= 0


def test_an_index_file_that_cannot_be_opened_is_a_relay_error_until_it_can(
    tmp_path: Path,
) -> None:
    wal_dir = tmp_path / "wal"
    a = make(wal_dir)
    try:
        first = a.send(reserve.s({"order": "k1"}), key="k1")
        (wal_dir / LOCK_NAME).unlink()
        (wal_dir / LOCK_NAME).mkdir()  # a re-open now fails
        with pytest.raises(KeyIndexError, match="remove"):
            a.send(reserve.s({"order": "k1"}), key="k1")
        (wal_dir / LOCK_NAME).rmdir()
        assert a.send(reserve.s({"order": "k1"}), key="k1").lsn == first.lsn
        assert keyed(a).count("k1") == 1
    finally:
        a.close()


def test_a_damaged_row_is_a_relay_error(tmp_path: Path) -> None:
    wal_dir = tmp_path / "wal"
    a = make(wal_dir)
    a.send(reserve.s({"order": "k1"}), key="k1")
    a.close()
    db = sqlite3.connect(wal_dir / DB_NAME)
    db.execute("UPDATE keys SET task_ids = '{' WHERE key = 'k1'")
    db.commit()
    db.close()
    b = make(wal_dir)
    try:
        with pytest.raises(KeyIndexError, match="damaged"):
            b.send(reserve.s({"order": "k1"}), key="k1")
        assert keyed(b).count("k1") == 1
    finally:
        b.close()
