"""Every decision is committed before it is acted on, and every action is idempotent: the service
is "killed" at each of its store writes in turn (just before it, and just after it), restarted
with a fresh Service over the same store and the same executor (runs outlive the scheduler, as
detached Ray actors do), and must then finish every job with no attempt launched twice, no job
ever running two attempts at once, and no GPU left to a job that is not running.

The real-process version (SIGKILL at random moments, real Ray cluster) is test_chaos.py."""
from __future__ import annotations

from collections import Counter

import pytest

from monitoring.gpu import FakeGpuReader
from scheduler.clock import FakeClock
from scheduler.daemon import FakeGpuLoad
from scheduler.executor import InMemoryExecutor
from scheduler.inventory import Inventory, NodeInfo
from scheduler.lifecycle import ACTIVE, JobState as S
from scheduler.service import Service
from scheduler.spec import ClusterConfig, TeamConfig
from scheduler.store import Store

WRITES = ("transition", "update_fields", "update_many", "upsert_node", "mark_node_lost", "set_drained")


class Crash(BaseException):
    """The process dies here (BaseException: no `except Exception` in the loop catches it)."""


class CrashingStore:
    """The real store, except that write number `at` kills the 'process' before or after it."""

    def __init__(self, store: Store, at: int, after: bool):
        self._store, self._at, self._after, self.writes = store, at, after, 0

    def __getattr__(self, name):
        attr = getattr(self._store, name)
        if name not in WRITES:
            return attr

        def write(*args, **kwargs):
            self.writes += 1
            if self.writes == self._at and not self._after:
                raise Crash(f"before write {self._at} ({name})")
            out = attr(*args, **kwargs)
            if self.writes == self._at:
                raise Crash(f"after write {self._at} ({name})")
            return out

        return write


class Overlaps(InMemoryExecutor):
    """Records, at every poll, whether any job has two runs at once."""

    def __init__(self, clock):
        super().__init__(clock, duration_s=lambda spec: spec["duration"])
        self.overlaps: list = []

    def poll(self):
        per_job = Counter(job for job, _ in self.runs)
        self.overlaps += [j for j, n in per_job.items() if n > 1]
        return super().poll()


def _scenario(tmp_path, url: str, crash_at: int, after: bool) -> tuple[Store, Overlaps, bool]:
    clock = FakeClock()
    store = Store(url)
    reader = FakeGpuReader(2)
    executor = Overlaps(clock)
    config = ClusterConfig(teams={"a": TeamConfig(gpus=2)})

    def service(s) -> Service:
        return Service(s, executor, Inventory(lambda: [NodeInfo("n1", "node-1")], {"n1": reader}), config,
                       clock, tmp_path, listeners=[FakeGpuLoad(reader)])

    for i, duration in enumerate([3, 5, 2, 4]):
        store.submit(spec={"name": f"j{i}", "duration": duration, "max_retries": 0}, name=f"j{i}", team="a",
                     user="u", priority=0, gpus=1, memory_per_gpu_mib=1000, now=clock.now())
    svc = service(CrashingStore(store, crash_at, after))
    crashed = False
    for t in range(40):
        if t > 3 and all(j.state.terminal for j in store.jobs()) and not executor.runs:
            break
        if t == 3:
            store.request_cancel(4)  # a user cancels the last job, mid-run or queued
        try:
            svc.tick()
        except Crash:
            crashed = True
            svc = service(store)  # restart: new process state, same store, runs still alive
            svc.recover()
        clock.advance(1)
    return store, executor, crashed


@pytest.mark.parametrize("after", [False, True], ids=["before-write", "after-write"])
def test_a_crash_at_any_write_loses_nothing_and_runs_nothing_twice(tmp_path, after):
    crashes, at, crashed = 0, 0, True
    while crashed:  # one crash point after another, until the scenario ends without reaching one
        at += 1
        store, executor, crashed = _scenario(tmp_path / f"home-{at}", "sqlite://", at, after)
        crashes += crashed
        try:
            jobs = store.jobs()
            where = f"crash at write {at} ({'after' if after else 'before'})"
            assert len(jobs) == 4, where
            assert all(j.state.terminal for j in jobs), (where, [(j.id, j.state) for j in jobs])
            assert [j.state for j in jobs if j.id != 4] == [S.SUCCEEDED] * 3, where
            launches = Counter(executor.launches)
            assert all(n == 1 for n in launches.values()), (where, launches)
            assert executor.overlaps == [], where
            assert not executor.runs, where  # nothing left running
            assert not [j for j in jobs if j.state not in ACTIVE and j.placement], where
        finally:
            store.close()
    assert crashes >= 25  # every write of the scenario was crashed at in turn
