"""Policy rules end to end through the Service (real SQLite store, FakeClock, InMemoryExecutor,
FakeGpuReader): fair share over many cycles, quota reclaim, live foreign memory, estimated starts."""
from __future__ import annotations

from pathlib import Path

import pytest

from monitoring.gpu import FakeGpuReader
from scheduler.clock import FakeClock
from scheduler.daemon import FakeGpuLoad
from scheduler.executor import InMemoryExecutor
from scheduler.inventory import Inventory, NodeInfo
from scheduler.lifecycle import JobState as S
from scheduler.service import Service
from scheduler.spec import ClusterConfig, CohortConfig, SchedulerSettings, TeamConfig
from scheduler.store import Store


class World:
    def __init__(self, tmp: Path, teams: dict[str, TeamConfig], gpus: int = 8, cohorts=("c",), **sched):
        self.clock = FakeClock()
        self.reader = FakeGpuReader(gpus)
        self.config = ClusterConfig(teams=teams, cohorts={c: CohortConfig() for c in cohorts},
                                    scheduler=SchedulerSettings(**sched))
        self.store = Store(f"sqlite:///{tmp / 'shoal.db'}")
        self.executor = InMemoryExecutor(self.clock, duration_s=lambda spec: spec["duration"])
        inv = Inventory(lambda: [NodeInfo("n1", "node-1")], {"n1": self.reader})
        self.service = Service(self.store, self.executor, inv, self.config, self.clock, tmp,
                               listeners=[FakeGpuLoad(self.reader)])

    def submit(self, team: str, gpus: int = 1, duration: float = 10, mem: int = 10000, expected: float | None = None,
               prio: int = 0):
        res = {"expected_duration_s": expected} if expected else {}
        return self.store.submit(spec={"name": "j", "duration": duration, "resources": res}, name="j", team=team,
                                 user="u", priority=prio, gpus=gpus, memory_per_gpu_mib=mem, now=self.clock.now())

    def run(self, seconds: float, step: float = 1.0) -> None:
        for _ in range(int(seconds / step)):
            self.service.tick()
            self.clock.advance(step)
        self.service.tick()

    def get(self, job):
        return self.store.get(job.id)


@pytest.fixture
def tmp(tmp_path):
    return tmp_path


def test_fair_share_converges_to_weights_over_many_cycles(tmp):
    # Both teams may use the whole cluster (nominal 8 each on 8 GPUs); weights 3:1 decide the split.
    w = World(tmp, {"a": TeamConfig(gpus=8, cohort="c", weight=3), "b": TeamConfig(gpus=8, cohort="c", weight=1)})
    jobs = {t: [w.submit(t, duration=5) for _ in range(80)] for t in ("a", "b")}  # more than either can run
    held = {"a": 0, "b": 0}
    for _ in range(60):
        w.service.tick()
        for j in w.store.active_jobs():
            held[j.team] += len(j.placement["gpu_indices"])
        w.clock.advance(1)
    share = held["a"] / (held["a"] + held["b"])
    assert 0.70 <= share <= 0.80, held  # 3:1 -> 0.75
    assert held["a"] + held["b"] >= 0.9 * 8 * 60  # the cluster stays busy
    w.store.close()
    del jobs


def test_quota_reclaim_preempts_the_borrower_which_resumes_later(tmp):
    w = World(tmp, {"a": TeamConfig(gpus=2, cohort="c"), "b": TeamConfig(gpus=2, cohort="c")}, gpus=4,
              min_runtime_s=5)
    borrowed = [w.submit("b", gpus=2, duration=100) for _ in range(2)]
    w.run(10)
    assert all(w.get(j).state is S.RUNNING for j in borrowed)  # b borrows a's idle 2 GPUs
    mine = w.submit("a", gpus=2, duration=5)
    w.run(3)
    states = sorted(w.get(j).state.value for j in borrowed)
    assert states == ["QUEUED", "RUNNING"] or states == ["PREEMPTING", "RUNNING"]
    assert w.get(mine).state in (S.STARTING, S.RUNNING)
    events = [e.reason for j in borrowed for e in w.store.events(j.id)]
    assert any("team b borrows beyond its nominal quota; team a reclaims its own" in r for r in events)
    w.run(10)
    assert w.get(mine).state is S.SUCCEEDED
    w.run(5)
    assert all(w.get(j).state in (S.RUNNING, S.STARTING, S.SUCCEEDED) for j in borrowed)  # resumed
    w.store.close()


def test_live_foreign_memory_is_respected(tmp):
    w = World(tmp, {"a": TeamConfig(gpus=2)}, gpus=2, cohorts=())
    w.reader.add_process(0, 78000)  # someone else's process fills GPU 0
    j1, j2 = w.submit("a", mem=20000), w.submit("a", mem=20000)
    w.service.tick()
    assert w.get(j1).placement["gpu_indices"] == [1]
    assert w.get(j2).state is S.QUEUED and "waiting for resources" in w.get(j2).pending_reason
    w.store.close()


def test_reservation_writes_estimated_start(tmp):
    w = World(tmp, {"a": TeamConfig(gpus=8)}, gpus=4, cohorts=())
    small = [w.submit("a", duration=100, expected=100) for _ in range(2)]
    w.run(1)
    big = w.submit("a", gpus=4, duration=10, expected=10)
    w.run(1)
    rec = w.get(big)
    assert rec.state is S.QUEUED and rec.pending_reason.startswith("reserved: starts at ~")
    assert rec.estimated_start_at == pytest.approx(w.get(small[0]).attempt_started_at + 100)
    w.run(100)
    rec = w.get(big)
    assert rec.state in (S.STARTING, S.RUNNING, S.SUCCEEDED) and rec.estimated_start_at is None
    w.store.close()


def test_the_whole_queue_gets_estimated_starts(tmp):
    """squeue --start through the service: 4 GPUs busy for 100 s; three 4-GPU jobs of 50 s wait.
    The first is reserved (+100) at once; within the forecast interval (30 s) the next ones get
    +150 and +200; they start in that order, close to their estimates."""
    w = World(tmp, {"a": TeamConfig(gpus=8)}, gpus=4, cohorts=())
    w.submit("a", gpus=4, duration=100, expected=100)
    w.run(1)
    t0 = w.clock.now()
    waiting = [w.submit("a", gpus=4, duration=50, expected=50) for _ in range(3)]
    w.run(1)
    assert w.get(waiting[0]).estimated_start_at is not None and w.get(waiting[1]).estimated_start_at is None
    w.run(30)
    etas = [w.get(j).estimated_start_at for j in waiting]
    assert all(e is not None for e in etas), [w.get(j).pending_reason for j in waiting]
    assert etas == sorted(etas) and etas[1] - etas[0] == pytest.approx(50) and etas[2] - etas[1] == pytest.approx(50)
    assert etas[0] == pytest.approx(t0 + 99, abs=2)
    w.run(260)
    starts = [next(e.ts for e in w.store.events(j.id) if e.to_state == "ADMITTED") for j in waiting]
    assert all(w.get(j).state is S.SUCCEEDED for j in waiting)
    assert all(abs(s - e) <= 5 for s, e in zip(starts, etas)), (starts, etas)
    w.store.close()


def test_higher_priority_preempts_lower_of_the_same_team(tmp):
    w = World(tmp, {"a": TeamConfig(gpus=2)}, gpus=2, cohorts=(), min_runtime_s=3)
    low = w.submit("a", gpus=2, duration=50)
    w.run(1)
    urgent = w.submit("a", gpus=2, duration=5, prio=10)
    w.run(1)
    assert w.get(low).state is S.RUNNING  # min_runtime_s not reached yet: no preemption
    assert w.get(urgent).state is S.QUEUED
    w.run(4)
    assert w.get(urgent).state in (S.STARTING, S.RUNNING)
    assert any("priority 10 job" in e.reason for e in w.store.events(low.id))
    w.run(10)
    assert w.get(urgent).state is S.SUCCEEDED and w.get(low).state in (S.STARTING, S.RUNNING)
    w.store.close()
