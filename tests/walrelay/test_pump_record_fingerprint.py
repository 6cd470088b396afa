"""Stale acks after a lost tail are told apart by the record they ran (review of 2026-11-30):
records of format version 1, odd send times, a restarted pump, a carried record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.targets import TARGETS, TASK_NAMES
from tests.support.lost_tail import SMALL_PUMP, lose_newest, task_lsn
from tests.support.pumprig import Rig, purchase
from walstore import Wal

pytestmark = pytest.mark.timeout(60)
SMALL = SMALL_PUMP


def _v1_payload(pid: str) -> bytes:
    """A record as the first release's relay.send wrote it (format version 1)."""
    p = purchase(pid)
    return json.dumps(
        {
            "v": 1,
            "key": pid,
            "tasks": [
                {"target": t, "name": TASK_NAMES[t], "queue": t, "args": [p], "kwargs": {}}
                for t in TARGETS
            ],
        }
    ).encode()


def test_acks_of_a_lost_v1_record_do_not_confirm_the_v2_record_at_its_lsn(
    tmp_path: Path,
) -> None:
    """Rolling upgrade: producers of the previous release still write v1 records; the
    new pump publishes them (copy "<run>.<n>." : no record part); the end of the log is
    lost; new-release producers' v2 records take those LSNs and task ids. The acks of
    the lost v1 records' copies must not confirm the new records."""
    wal_dir = tmp_path / "wal"
    wal = Wal.open(wal_dir, SMALL)
    rig = Rig(wal, tmp_path)
    for i in range(60):
        wal.append(_v1_payload(f"old{i}"))
    rig.steps(3)
    before = rig.take("warehouse") + rig.take("finance")  # published by THIS release's pump
    assert before and all(m.copy.count(".") >= 2 for m in before)
    wal.close()
    lost_from = lose_newest(wal_dir)

    wal = Wal.open(wal_dir, SMALL)
    try:
        rig = Rig(wal, tmp_path)
        new = rig.append(5, prefix="new")  # v2, as relay.send writes today
        assert new[0] == lost_from
        rig.steps(3)
        fresh = [
            m for m in rig.take("warehouse") + rig.take("finance") if task_lsn(m.task_id) in new
        ]
        stale = [m for m in before if task_lsn(m.task_id) in new]
        assert {m.task_id for m in stale} == {m.task_id for m in fresh}  # same task ids
        rig.ack(stale)  # workers ran the lost v1 records' messages
        rig.steps(3)
        # Expected: ignored (stale); the new records' tasks have not run.
        assert rig.pump.stats.acked == 0, rig.pump.stats
        assert rig.pump.stats.stale_acks == len(stale)
        assert set(new) <= set(rig.pump.inflight)
    finally:
        wal.close()


@pytest.mark.parametrize(
    "created", ["1e999", "-1e999", "NaN", "-0.0", "1" + "0" * 400, '"nan"', '"abc"', "true", "[]"]
)
def test_odd_created_does_not_stop_the_pump(tmp_path: Path, created: str) -> None:
    wal_dir = tmp_path / "wal"
    wal = Wal.open(wal_dir, SMALL)
    try:
        rig = Rig(wal, tmp_path)
        p = purchase("odd")
        poison = wal.append(
            (
                '{"v":2,"key":"odd","order_key":null,"origin":null,"created":'
                + created
                + ',"tasks":[{"target":"warehouse","name":"'
                + TASK_NAMES["warehouse"]
                + '","queue":"warehouse","args":['
                + json.dumps(p)
                + '],"kwargs":{}}]}'
            ).encode()
        )
        good = rig.append(3)
        rig.steps(3)
        msgs = rig.take("warehouse") + rig.take("finance")
        rig.ack(msgs)
        rig.steps(3)
        rig.drain(5)
        assert not rig.pump.inflight
        assert wal.low_water_mark() == good[-1] + 1
        assert poison < good[0]
    finally:
        wal.close()


def test_restart_copies_of_the_same_record_still_count(tmp_path: Path) -> None:
    """No loss, pump restarted: the previous run's copies confirm (same record)."""
    wal_dir = tmp_path / "wal"
    wal = Wal.open(wal_dir, SMALL)
    try:
        rig = Rig(wal, tmp_path)
        new = rig.append(5)
        rig.steps(3)
        first = rig.take("warehouse") + rig.take("finance")
        rig.pump = rig.new_pump()  # restart (the old one's state dropped)
        rig.steps(3)
        second = rig.take("warehouse") + rig.take("finance")
        rig.ack(first)
        rig.steps(3)
        assert rig.pump.stats.stale_acks == 0
        assert rig.pump.stats.acked == len(first)
        assert not rig.pump.inflight
        rig.ack(second)
        rig.steps(3)
        assert wal.low_water_mark() == new[-1] + 1
    finally:
        wal.close()


def test_a_carried_record_is_confirmed_by_its_own_copies(tmp_path: Path) -> None:
    """A long countdown: the pump carries the record to a new LSN (origin set), then
    publishes it when due; the worker's ack of that copy confirms it."""
    from tests.support.pumprig import WALL_START
    from walrelay.record import TaskSpec

    wal_dir = tmp_path / "wal"
    wal = Wal.open(wal_dir, SMALL)
    try:
        rig = Rig(wal, tmp_path, carry_after=60.0)
        eta = WALL_START + 600
        lsn = rig.append_entry(
            TaskSpec(
                "warehouse", TASK_NAMES["warehouse"], "warehouse", [purchase("c")], {}, {"eta": eta}
            ),
            key="c",
            created=1234.5,
        )
        rig.run_for(120, every=1)
        assert rig.pump.stats.carried == 1
        rig.run_for(600, every=1)
        msgs = rig.take("warehouse")
        assert msgs and all(task_lsn(m.task_id) == lsn for m in msgs)
        rig.ack(msgs[-1:])
        rig.steps(3)
        assert (rig.pump.stats.acked, rig.pump.stats.stale_acks) == (1, 0)
        assert not rig.pump.inflight
    finally:
        wal.close()
