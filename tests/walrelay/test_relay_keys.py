"""Idempotency keys of relay.send: the same tasks again -> the first receipt, nothing
appended; other tasks -> DuplicateKeyError; across threads, processes, restarts, a
sender killed between its append and its insert, and a reboot that lost the index's
last rows. The key rules are tested as a state machine against a model (hypothesis)."""

from __future__ import annotations

import itertools
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tests.walrelay.shop_app import app as shop
from tests.walrelay.shop_tasks import audit, reserve
from walrelay import DuplicateKeyError, Receipt, Relay, RelaySettings, keys
from walrelay import relay as relay_mod
from walrelay.record import decode
from walstore import Options, SyncPolicy

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]
FAST = Options(sync=SyncPolicy.NONE, segment_bytes=1 << 20)


def make(wal_dir: Path, window: float = 3600.0) -> Relay:
    settings_ = RelaySettings(wal_dir=str(wal_dir), idempotency_window=window)
    return Relay(shop, str(wal_dir), settings=settings_, wal_options=FAST)


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    r = make(tmp_path / "wal")
    yield r
    r.close()


def keyed(relay: Relay) -> list[str | None]:
    return [decode(p).key for _, p in relay.wal().iter_from(0)]


# ------------------------------------------------------------------ the rules
def test_same_key_same_tasks_returns_the_first_receipt(relay: Relay) -> None:
    first = relay.send(reserve.s({"o": 1}), audit.s({"o": 1}), key="k", order_key="c")
    again = relay.send(reserve.s({"o": 1}), audit.s({"o": 1}), key="k", order_key="c")
    assert again == first
    assert keyed(relay) == ["k"]


def test_a_retry_with_a_countdown_is_the_same_send(relay: Relay) -> None:
    """eta and expires are not compared: a retried send's countdown counts from its own
    time, so the same request sent twice a second apart is still the same."""
    first = relay.send(reserve.s(1).set(countdown=60, expires=600), key="k")
    time.sleep(0.01)
    assert relay.send(reserve.s(1).set(countdown=60, expires=600), key="k") == first
    assert relay.wal().next_lsn() == 1


@pytest.mark.parametrize(
    "other",
    [
        lambda: [reserve.s({"o": 2})],  # other arguments
        lambda: [reserve.s({"o": 1}), audit.s({"o": 1})],  # one task more
        lambda: [audit.s({"o": 1})],  # another task
        lambda: [reserve.s({"o": 1}).set(queue="audit")],  # another route
        lambda: [reserve.s({"o": 1}).set(priority=7)],
    ],
)
def test_same_key_other_tasks_is_refused_and_appends_nothing(relay: Relay, other: Any) -> None:
    first = relay.send(reserve.s({"o": 1}), key="k")
    with pytest.raises(DuplicateKeyError, match=f"LSN {first.lsn}"):
        relay.send(*other(), key="k")
    with pytest.raises(DuplicateKeyError):
        relay.send(reserve.s({"o": 1}), key="k", order_key="another")
    assert keyed(relay) == ["k"]


def test_a_key_is_forgotten_after_the_window_and_purged(tmp_path: Path) -> None:
    short = make(tmp_path / "wal", window=0.3)
    try:
        first = short.send(reserve.s(1), key="k")
        time.sleep(0.4)
        again = short.send(reserve.s(2), key="k")  # other tasks: fine, the key expired
        assert (first.lsn, again.lsn) == (0, 1)
        index = keys.index_for(short.wal())
        index.note_carried([("k", 1, 5)])  # the pump carried it forward
        index._next_purge = 0.0  # purge on the next keyed send
        time.sleep(0.4)
        short.send(reserve.s(3), key="other")
        db = sqlite3.connect(tmp_path / "wal" / keys.DB_NAME)
        assert [r[0] for r in db.execute("SELECT key FROM keys")] == ["other"]
        assert db.execute("SELECT count(*) FROM carried").fetchone() == (0,)  # with its key
    finally:
        short.close()


def test_window_zero_turns_keys_off(tmp_path: Path) -> None:
    off = make(tmp_path / "wal", window=0)
    try:
        assert [off.send(reserve.s(1), key="k").lsn for _ in range(2)] == [0, 1]
        assert not (tmp_path / "wal" / keys.DB_NAME).exists()
    finally:
        off.close()


def test_index_files_are_private(relay: Relay, tmp_path: Path) -> None:
    relay.send(reserve.s(1), key="k")
    for name in (keys.DB_NAME, keys.LOCK_NAME):
        assert (tmp_path / "wal" / name).stat().st_mode & 0o777 == 0o600


def test_threads_sending_one_key_append_once(relay: Relay) -> None:
    results: list[Receipt] = []
    start = threading.Barrier(8)

    def send() -> None:
        start.wait()
        results.append(relay.send(reserve.s({"o": 1}), key="same"))

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 8 and len(set(results)) == 1
    assert keyed(relay) == ["same"]


# ------------------------------------------------------------------ processes, crashes
SENDER = """
import json, os, sys, time
from tests.walrelay.shop_app import app
from tests.walrelay.shop_tasks import reserve
from walrelay import Relay, RelaySettings, keys
from walstore import Options, SyncPolicy
wal_dir, key, start_at, mode = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
relay = Relay(app, wal_dir, settings=RelaySettings(wal_dir=wal_dir),
              wal_options=Options(sync=SyncPolicy.NONE, segment_bytes=1 << 20))
relay.wal()
if mode == "die-after-append":
    keys.KeyIndex._insert = lambda *a, **k: os._exit(9)
while time.time() < start_at:
    time.sleep(0.001)
r = relay.send(reserve.s({"order": key}), key=key)
print(json.dumps([r.lsn, r.key, list(r.task_ids)]))
"""


Done = subprocess.CompletedProcess[str]


def run_senders(wal_dir: Path, jobs: list[tuple[str, str]]) -> list[Done]:
    start_at = str(time.time() + 3.0)  # every process is up and has the log open by then
    procs = [
        subprocess.Popen([sys.executable, "-c", SENDER, str(wal_dir), key, start_at, mode],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for key, mode in jobs
    ]  # fmt: skip
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=60)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def test_processes_sending_one_key_at_once_append_exactly_once(tmp_path: Path) -> None:
    wal_dir = tmp_path / "wal"
    done = run_senders(wal_dir, [("same", "send")] * 6 + [(f"k{i}", "send") for i in range(6)])
    assert [p.returncode for p in done] == [0] * 12, [p.stderr for p in done]
    same = {p.stdout for p in done[:6]}
    assert len(same) == 1, same  # one receipt for all six
    r = make(wal_dir)
    try:
        stored = keyed(r)
    finally:
        r.close()
    assert sorted(stored, key=str) == sorted(["same"] + [f"k{i}" for i in range(6)])


def test_a_sender_killed_between_append_and_insert_is_recovered(tmp_path: Path) -> None:
    """The record is in the log but not in the index: the next sender of that stripe
    (here: of that key) finds the dead sender's slot, indexes the record, and answers
    the first receipt instead of appending it twice."""
    wal_dir = tmp_path / "wal"
    [dead] = run_senders(wal_dir, [("lost", "die-after-append")])
    assert dead.returncode == 9
    rows = sqlite3.connect(wal_dir / keys.DB_NAME).execute("SELECT count(*) FROM keys")
    assert rows.fetchone() == (0,)  # killed before the insert
    [again] = run_senders(wal_dir, [("lost", "send")])
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("[0, ")  # the dead sender's LSN: no second record
    r = make(wal_dir)
    try:
        assert keyed(r) == ["lost"]
    finally:
        r.close()


def test_a_new_process_resolves_a_dead_senders_slot_at_open(tmp_path: Path) -> None:
    wal_dir = tmp_path / "wal"
    [dead] = run_senders(wal_dir, [("lost", "die-after-append")])
    assert dead.returncode == 9
    r = make(wal_dir)
    try:
        r.send(reserve.s({"order": "other"}), key="other")  # opens the index
        rows = sqlite3.connect(wal_dir / keys.DB_NAME).execute("SELECT key, lsn FROM keys")
        assert sorted(rows) == [("lost", 0), ("other", 1)]
    finally:
        r.close()


def forget_rows_as_after_a_power_cut(wal_dir: Path) -> None:
    """What a reboot leaves: the index's last rows lost (synchronous=NORMAL), and the
    boot id changed."""
    if not (wal_dir / keys.DB_NAME).exists():
        return  # no keyed send yet
    db = sqlite3.connect(wal_dir / keys.DB_NAME, isolation_level=None)
    db.execute("DELETE FROM keys")
    db.execute("UPDATE meta SET value = 'an-earlier-boot' WHERE name = 'boot_id'")
    db.close()


def test_after_a_reboot_the_index_is_rebuilt_from_the_log(tmp_path: Path) -> None:
    wal_dir = tmp_path / "wal"
    r = make(wal_dir)
    try:
        first = r.send(reserve.s(1), audit.s(1), key="a")
        r.send(reserve.s(2))
        second = r.send(reserve.s(3), key="b")
    finally:
        r.close()
    forget_rows_as_after_a_power_cut(wal_dir)
    r = make(wal_dir)
    try:
        assert r.send(reserve.s(1), audit.s(1), key="a") == first
        assert r.send(reserve.s(3), key="b") == second
        with pytest.raises(DuplicateKeyError):
            r.send(reserve.s(4), key="b")
        assert r.wal().next_lsn() == 3
    finally:
        r.close()


# ------------------------------------------------------------------ the state machine
class FakeClock:
    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def time(self) -> float:
        return self.now


WINDOW = 100.0
MACHINES = itertools.count()
CLOCK = FakeClock()  # what send and the index read as time.time during the machine


class KeyRules(RuleBasedStateMachine):
    """Model: key -> (payload, first LSN, send time). A send within the window returns
    the first receipt (same payload) or raises (other payload); otherwise it appends.
    Crashes between append and insert and reboots that lose rows change nothing the
    model can see."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(os.environ["KEYRULES_TMP"]) / f"m{next(MACHINES)}"
        self.clock = CLOCK
        self.relay = make(self.dir, window=WINDOW)
        self.model: dict[str, tuple[int, int, float]] = {}
        self.appended = 0

    def _send(self, key: str, payload: int) -> Receipt | None:
        try:
            return self.relay.send(reserve.s(payload), key=key)
        except DuplicateKeyError:
            return None

    def _expect(self, key: str, payload: int) -> tuple[int, int, float] | None:
        live = self.model.get(key)
        if live is not None and live[2] > self.clock.now - WINDOW:
            return live
        return None

    @rule(key=st.sampled_from("abcd"), payload=st.integers(0, 2))
    def send(self, key: str, payload: int) -> None:
        live = self._expect(key, payload)
        got = self._send(key, payload)
        if live is None:
            assert got is not None and got.lsn == self.appended
            self.model[key] = (payload, got.lsn, self.clock.now)
            self.appended += 1
        elif live[0] == payload:
            assert got is not None and got.lsn == live[1]
        else:
            assert got is None

    @rule(key=st.sampled_from("abcd"), payload=st.integers(0, 2))
    def crash_after_append(self, key: str, payload: int) -> None:
        if self._expect(key, payload) is not None:
            return  # would not append: nothing to crash in
        index = keys.index_for(self.relay.wal())

        def die(*_: Any) -> None:
            raise KeyboardInterrupt("killed")

        index._insert = die  # type: ignore[method-assign,assignment]
        try:
            self._send(key, payload)
        except KeyboardInterrupt:
            pass
        finally:
            del index._insert
        self.model[key] = (payload, self.appended, self.clock.now)
        self.appended += 1

    @rule()
    def reboot_losing_rows(self) -> None:
        self.relay.close()
        forget_rows_as_after_a_power_cut(self.dir)
        self.relay = make(self.dir, window=WINDOW)

    @rule(seconds=st.sampled_from([1.0, 60.0, 150.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock.now += seconds

    @invariant()
    def log_holds_exactly_what_was_appended(self) -> None:
        assert self.relay.wal().next_lsn() == self.appended

    def teardown(self) -> None:
        self.relay.close()


@pytest.mark.timeout(300)
def test_key_rules_state_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYRULES_TMP", str(tmp_path))
    monkeypatch.setattr(relay_mod, "time", CLOCK)
    monkeypatch.setattr(keys, "time", CLOCK)
    KeyRules.TestCase.settings = settings(
        max_examples=40, stateful_step_count=25, deadline=None, database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )  # fmt: skip
    KeyRules.TestCase().runTest()
