"""Group commit (walstore.commit) as a state machine, against a model.

Each ``Wal`` handle stands for a process (its own descriptors, locks and mapping). The
steps of the protocol are driven one at a time, in every order hypothesis finds: a
producer fills its slot; a leader takes the write lock and writes its own records and
every ready slot, and is killed at any file-system call (or between updating the write
state and marking its slots written); a producer collects its result; a producer dies
with its slot ready; the power goes. The model: what was acknowledged, and which records
form one batch.

After every step, in the log as readers see it: LSNs contiguous, every acknowledged
record at its LSN with its payload, no payload twice, every batch whole or absent (never
a half batch mid-log). After every power loss the same, on what recovery finds, except
that a torn write may leave the first records of the last batch at the very end (as
for any write a power cut interrupts: no append had returned)."""

from __future__ import annotations

import random
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tests.support.faultfs import FaultFs, SimulatedCrash
from walstore import LogFullError, LogPoisonedError, Options, SyncPolicy, Wal
from walstore.inspect import verify
from walstore.shm import SLOT_CAPACITY, SLOT_FAILED, SLOT_WRITTEN, SharedState

pytestmark = pytest.mark.timeout(300)

SIZES = st.lists(st.integers(0, 700), min_size=1, max_size=3)
HANDLES = st.integers(0, 3)


class GroupCommit(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="wal-group-")
        self.fs = FaultFs()
        self.opts = Options()
        self.wals: dict[int, Wal] = {}
        self.slots: dict[int, tuple[int, list[bytes]]] = {}  # handle -> (slot, payloads)
        self.acked: dict[int, bytes] = {}
        self.batches: list[list[bytes]] = []  # every batch ever handed to the log
        self.n = 0

    @initialize(segment_bytes=st.integers(4160, 9000), preallocate=st.booleans())
    def start(self, segment_bytes: int, preallocate: bool) -> None:
        self.opts = Options(segment_bytes=segment_bytes, preallocate=preallocate,
                            sync=SyncPolicy.ALWAYS, min_free_bytes=0, fs=self.fs)  # fmt: skip

    def teardown(self) -> None:
        for wal in self.wals.values():
            wal._abandon()
        shutil.rmtree(self.dir, ignore_errors=True)

    def wal(self, h: int) -> Wal:
        if h not in self.wals:
            self.wals[h] = Wal.open(self.dir, self.opts)
        return self.wals[h]

    def payloads(self, sizes: list[int]) -> list[bytes]:
        out = []
        for size in sizes:
            self.n += 1
            out.append(f"{self.n}|".encode().ljust(size, b"p"))
        self.batches.append(out)
        return out

    def ack(self, first: int, payloads: list[bytes]) -> None:
        for i, payload in enumerate(payloads):
            lsn = first + i
            assert self.acked.get(lsn, payload) == payload, f"LSN {lsn} acknowledged twice"
            self.acked[lsn] = payload

    def die(self, h: int) -> None:
        """Process ``h`` is killed: its descriptors (and so its locks and slots) go."""
        self.wals.pop(h)._abandon()
        self.slots.pop(h, None)
        self.fs.revive()

    # ------------------------------------------------------------- steps
    @precondition(lambda self: len(self.slots) < 4)
    @rule(h=HANDLES, sizes=SIZES)
    def fill_slot(self, h: int, sizes: list[int]) -> None:
        if h in self.slots:
            return
        writer = self.wal(h)._w
        slot = writer._pool.get()
        assert slot is not None
        payloads = self.payloads(sizes)
        writer._shm.fill_slot(slot, payloads)
        self.slots[h] = (slot, payloads)

    @rule(h=HANDLES, own=st.none() | SIZES, kill_at=st.none() | st.integers(0, 6))
    def lead(self, h: int, own: list[int] | None, kill_at: int | None) -> None:
        writer = self.wal(h)._w
        payloads = self.payloads(own) if own else None
        assert writer._wlock.acquire(blocking=False)  # one thread here: always free
        if kill_at is not None:
            self.fs.kill_after(kill_at)
        try:
            got = writer._lead(payloads)
        except SimulatedCrash:
            self.die(h)
            return
        except (LogFullError, LogPoisonedError):
            return
        finally:
            self.fs.clear_faults()
        if payloads:
            assert len(got) == len(payloads)
            self.ack(got.start, payloads)

    @rule(h=HANDLES)
    def leader_dies_before_marking_its_slots(self, h: int) -> None:
        """Killed between updating the write state (its records are in the log) and
        marking its slots written: the next leader must settle them, not write again."""
        writer = self.wal(h)._w
        shm = writer._shm
        real = SharedState.set_slot_state

        def dies(self_: SharedState, slot: int, state: int, err: int = 0) -> None:
            if state == SLOT_WRITTEN:
                raise SimulatedCrash("between the write state and the slots")
            real(self_, slot, state, err)

        assert writer._wlock.acquire(blocking=False)
        shm.set_slot_state = dies.__get__(shm)  # type: ignore[method-assign]
        try:
            writer._lead(None)
        except SimulatedCrash:
            self.die(h)
            return
        finally:
            if h in self.wals:
                del shm.set_slot_state

    @rule(h=HANDLES)
    def collect(self, h: int) -> None:
        if h not in self.slots:
            return
        writer = self.wals[h]._w
        slot, payloads = self.slots[h]
        state, first, count, _err = writer._shm.slot_result(slot)
        if state == SLOT_WRITTEN and writer._shm.synced_lsn() >= first + count:
            assert count == len(payloads)
            self.ack(first, payloads)
        elif state != SLOT_FAILED:
            return  # not written, or not durable yet
        writer._release_slot(slot)
        del self.slots[h]

    @precondition(lambda self: bool(self.wals))
    @rule(data=st.data())
    def process_dies(self, data: st.DataObject) -> None:
        self.die(data.draw(st.sampled_from(sorted(self.wals))))

    @rule(keep=st.integers(0, 8), tear=st.none() | st.integers(0, 300))
    def power_loss(self, keep: int, tear: int | None) -> None:
        for h in list(self.wals):
            self.die(h)
        self.fs.crash(keep_writes=keep, tear=tear)
        wal = self.wal(0)  # recovery
        # A torn write may leave the first records of the last (unacknowledged) batch,
        # at the very end of the log: that is what recovery found, the new truth.
        payloads = [p for _, p in wal.iter_from(wal.first_lsn())]
        tail = payloads[-1] if payloads else None
        for i, batch in enumerate(self.batches):
            if tail in batch:
                kept = batch[: batch.index(tail) + 1]
                assert payloads[len(payloads) - len(kept) :] == kept
                self.batches[i] = kept
        self.check(wal)

    # ------------------------------------------------------------- checks
    def check(self, wal: Wal) -> None:
        records = list(wal.iter_from(wal.first_lsn()))
        lsns = [lsn for lsn, _ in records]
        assert lsns == list(range(lsns[0], lsns[0] + len(lsns))) if lsns else True
        by_lsn = dict(records)
        for lsn, payload in self.acked.items():
            assert by_lsn.get(lsn) == payload, f"acknowledged LSN {lsn} lost or changed"
        payloads = [p for _, p in records]
        assert len(set(payloads)) == len(payloads), "a record is in the log twice"
        where = {p: i for i, p in enumerate(payloads)}
        for batch in self.batches:
            found = [where.get(p) for p in batch]
            if any(i is not None for i in found):
                start = found[0]
                assert start is not None and found == list(range(start, start + len(batch))), (
                    "half a batch in the log", batch, found)  # fmt: skip

    @invariant()
    def log_is_consistent(self) -> None:
        if self.wals:
            self.check(next(iter(self.wals.values())))


TestGroupCommit = GroupCommit.TestCase
TestGroupCommit.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_machine_runs_smoke() -> None:
    """The machine above reaches its interesting states (else it proves nothing)."""
    state: Any = GroupCommit()
    try:
        state.start(segment_bytes=4160, preallocate=True)
        state.fill_slot(1, [100])
        state.fill_slot(2, [50, 60])
        state.lead(0, [10], None)
        state.collect(1)
        state.collect(2)
        assert len(state.acked) == 4
        state.fill_slot(1, [200])
        state.leader_dies_before_marking_its_slots(0)
        state.lead(2, None, None)  # settles slot of handle 1 as written
        state.collect(1)
        assert len(state.acked) == 5
        state.log_is_consistent()
    finally:
        state.teardown()


@pytest.mark.timeout(120)
def test_threads_of_several_handles_append_at_once(tmp_path: Path) -> None:
    """Real concurrency: 3 handles x 4 threads, small and slot-sized and too-big-for-a-slot
    records, tiny segments (roll-overs mid-batch): every acknowledged record once, at its
    LSN; the log verifies."""
    opts = Options(segment_bytes=4160, min_free_bytes=0, sync=SyncPolicy.ALWAYS)
    wals = [Wal.open(tmp_path, opts) for _ in range(3)]
    acked: dict[int, bytes] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work(w: int, t: int) -> None:
        rng = random.Random(w * 10 + t)
        try:
            for n in range(40):
                size = rng.choice((10, 300, 3000, SLOT_CAPACITY + 100))
                batch = [f"{w}.{t}.{n}.{k}|".encode().ljust(size, b"x")
                         for k in range(rng.choice((1, 1, 3)))]  # fmt: skip
                lsns = wals[w].append_batch(batch)
                with lock:
                    for lsn, payload in zip(lsns, batch, strict=True):
                        assert lsn not in acked, f"LSN {lsn} handed out twice"
                        acked[lsn] = payload
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w, t)) for w in range(3) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(100)
    for wal in wals:
        wal.close()
    assert not errors, errors[:3]
    assert verify(str(tmp_path)).ok
    with Wal.open(tmp_path, opts) as wal:
        got = dict(wal.iter_from(0))
    assert got == acked  # nothing else, nothing missing
