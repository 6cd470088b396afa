"""The pump across broker outages (issue 12): a broker that kept its queues is not sent
the window again; what a cut-short publish may not have delivered is; a broker that lost
its queues gets everything in flight again. Examples, then a hypothesis state machine
against a model: after any sequence of outages, restarts and cut-short publishes, every
unconfirmed task has a copy queued in the broker once the pump has looked at it again."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from tests.support.pumprig import Rig
from walrelay.record import parse_task_id, task_id
from walstore import Options, SyncPolicy, Wal

pytestmark = pytest.mark.timeout(120)
NO_TIMER = 1e9  # ack timeouts: sessions only, no suspicions


@pytest.fixture
def rig(wal: Wal, tmp_path: Path) -> Rig:
    return Rig(wal, tmp_path, ack_timeout=NO_TIMER, max_ack_timeout=NO_TIMER)


def broker_down(rig: Rig) -> bool:
    return rig.pump.stats.broker_down  # a call: mypy would narrow the attribute for good


def queued_ids(rig: Rig) -> list[str]:
    return [m.task_id for q in rig.broker.queues.values() for m in q]


@pytest.fixture
def kept(wal: Wal, tmp_path: Path) -> Rig:
    rig = Rig(wal, tmp_path, ack_timeout=NO_TIMER, max_ack_timeout=NO_TIMER)
    rig.broker.keeps_queues = True
    return rig


def test_an_outage_of_a_broker_that_kept_its_queues_resends_nothing(kept: Rig) -> None:
    kept.append(5)
    kept.steps(1)
    assert kept.broker.published == 10
    kept.broker.down = True
    kept.steps(3)
    assert broker_down(kept)
    kept.broker.down = False
    kept.steps(3)
    assert not broker_down(kept)
    assert kept.pump.stats.redelivered == 0 and kept.broker.published == 10
    assert kept.pump.stats.broker_sessions == 1


def test_a_publish_cut_short_is_sent_again_and_nothing_before_it(kept: Rig) -> None:
    kept.append(5)
    kept.steps(1)
    first = sorted(queued_ids(kept))
    kept.append(5)
    kept.broker.fail_after = 3  # 3 of the next 10 stored, then the connection is lost
    kept.steps(1)
    assert broker_down(kept)
    kept.broker.down = False
    kept.steps(3)
    assert kept.pump.stats.redelivered == 10  # the cut-short batch, not the first one
    ids = queued_ids(kept)
    assert sorted(set(ids) - set(first)) == sorted(
        task_id(kept.wal.wal_id, lsn, t) for lsn in range(5, 10) for t in ("warehouse", "finance")
    )
    assert all(ids.count(i) == 1 for i in first)


def test_an_outage_of_a_broker_that_lost_its_queues_resends_everything(rig: Rig) -> None:
    rig.append(4)
    rig.steps(1)
    rig.broker.down = True
    rig.steps(2)
    rig.broker.restart()
    rig.broker.down = False
    rig.steps(2)
    assert rig.pump.stats.redelivered == 8
    assert len(set(queued_ids(rig))) == 8


class PumpAcrossOutages(RuleBasedStateMachine):
    """The model: the set of (lsn, target) not yet acked. The worker takes messages in
    order and acks each at once, so an unacked task must still be queued somewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp: Path | None = None
        self.wal: Wal | None = None
        self.rig: Rig | None = None
        self.unacked: set[tuple[int, str]] = set()
        self.looked = True  # the pump checked the session since the broker came back

    @initialize(keeps=st.booleans())
    def start(self, keeps: bool) -> None:
        import tempfile

        self.tmp = Path(tempfile.mkdtemp(prefix="pump-sessions-"))
        self.wal = Wal.open(self.tmp / "wal", Options(segment_bytes=8192, sync=SyncPolicy.NONE))
        self.rig = Rig(self.wal, self.tmp, ack_timeout=NO_TIMER, max_ack_timeout=NO_TIMER)
        self.rig.broker.keeps_queues = keeps

    @property
    def r(self) -> Rig:
        assert self.rig is not None
        return self.rig

    @rule(n=st.integers(1, 4))
    def append(self, n: int) -> None:
        for lsn in self.r.append(n, prefix=f"a{self.r.wal.next_lsn()}-"):
            self.unacked |= {(lsn, "warehouse"), (lsn, "finance")}

    @rule(n=st.integers(1, 3))
    def step(self, n: int) -> None:
        self.r.steps(n)
        if not self.r.broker.down:
            self.looked = True

    @rule(k=st.integers(1, 6))
    def worker_takes_and_acks(self, k: int) -> None:
        if self.r.broker.down:
            return
        for queue in ("warehouse", "finance"):
            taken = self.r.broker.take(queue, k)
            self.r.ack(taken)
            for msg in taken:
                parsed = parse_task_id(msg.task_id)
                assert parsed is not None
                self.unacked.discard((parsed[1], parsed[2]))

    @rule(lost=st.booleans())
    def outage(self, lost: bool) -> None:
        self.r.broker.down = True
        self.r.steps(2)
        if lost or not self.r.broker.keeps_queues:
            self.r.broker.restart()
        self.r.broker.down = False
        self.looked = False

    @rule(n=st.integers(0, 5))
    def cut_short(self, n: int) -> None:
        if not self.r.broker.down:
            self.r.broker.fail_after = n
            self.looked = False

    @invariant()
    def every_unacked_task_is_queued(self) -> None:
        if self.rig is None or not self.looked or self.r.broker.fail_after is not None:
            return
        if self.r.broker.down:
            return
        queued = set()
        for tid in queued_ids(self.r):
            parsed = parse_task_id(tid)
            assert parsed is not None
            queued.add((parsed[1], parsed[2]))
        in_flight = {(lsn, t) for lsn, f in self.r.pump.inflight.items() for t in f.targets}
        missing = (in_flight & self.unacked) - queued  # acked ones wait for the pump only
        assert not missing, sorted(missing)[:5]

    def teardown(self) -> None:
        if self.rig is not None:
            rig = self.rig
            rig.broker.down, rig.broker.fail_after = False, None
            for _ in range(50):
                rig.steps(2)
                rig.ack_everything()
                if not rig.pump.inflight and rig.pump.cursor.next_lsn == rig.wal.next_lsn():
                    break
            rig.steps(2)
            assert not rig.pump.inflight, "the pump could not drain after the outages"
            assert rig.deadletters.list() == []
        if self.wal is not None:
            self.wal.close()


TestPumpAcrossOutages = PumpAcrossOutages.TestCase
TestPumpAcrossOutages.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip
