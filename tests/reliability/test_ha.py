"""Leader lease and fencing on SQLite and PostgreSQL: one leader at a time, takeover after the
lease expires (or at once after a clean release or a restart of the same replica), and a fenced
ex-leader's writes are refused with nothing written."""
from __future__ import annotations

import threading

import pytest

from scheduler.clock import FakeClock
from scheduler.ha import LeaderElector
from scheduler.lifecycle import JobState as S
from scheduler.store import Fenced, Store
from tests.reliability.db import db_url, pg_database  # noqa: F401 - fixtures


def _submit(store):
    return store.submit(spec={"name": "x"}, name="x", team="a", user="u", priority=0, gpus=1,
                        memory_per_gpu_mib=10, now=1.0)


@pytest.fixture
def pair(db_url):
    clock = FakeClock()
    a, b = Store(db_url), Store(db_url)
    yield clock, LeaderElector(a, "replica-a", clock, ttl_s=8, renew_s=2), LeaderElector(b, "replica-b", clock, ttl_s=8, renew_s=2)
    a.close()
    b.close()


def test_one_leader_then_takeover_after_expiry_fences_the_old_one(pair):
    clock, a, b = pair
    assert a.try_acquire() and a.token == 1
    assert not b.try_acquire() and not b.leading
    job = _submit(a.store)
    a.store.transition(job.id, S.QUEUED, S.ADMITTED, reason="placed", now=2, attempt=1)  # the leader writes
    with pytest.raises(Fenced):  # a follower's loop cannot write
        b.store.transition(job.id, S.ADMITTED, S.QUEUED, reason="x", now=2)
    clock.advance(5)
    assert a.renew()
    clock.advance(7)  # renewed 7 s ago, ttl 8: still a's
    assert not b.try_acquire()
    clock.advance(2)  # a stopped renewing (paused, partitioned, dead): expired
    assert b.try_acquire() and b.token == 2
    with pytest.raises(Fenced, match="fencing token 1 is stale"):
        a.store.transition(job.id, S.ADMITTED, S.STARTING, reason="late write", now=3)
    with pytest.raises(Fenced):
        a.store.update_fields(job.id, pending_reason="late")
    rec = b.store.get(job.id)
    assert rec.state is S.ADMITTED and rec.pending_reason is None
    assert [e.reason for e in b.store.events(job.id)] == ["submitted", "placed"]
    assert not a.renew() and not a.leading  # and a learns it lost the lease
    b.store.transition(job.id, S.ADMITTED, S.STARTING, reason="launched", now=4)


def test_release_hands_over_at_once(pair):
    _, a, b = pair
    assert a.try_acquire()
    a.release()
    assert b.try_acquire() and b.token == 2


def test_a_restarted_replica_takes_its_lease_back_at_once_and_fences_its_old_self(pair, db_url):
    clock, a, b = pair
    assert a.try_acquire()
    again = LeaderElector(Store(db_url), "replica-a", clock)
    try:
        assert again.try_acquire() and again.token == 2
        assert not b.try_acquire()
        with pytest.raises(Fenced):
            a.store.update_fields(_submit(again.store).id, pending_reason="x")
    finally:
        again.store.close()


def test_concurrent_acquires_elect_exactly_one(db_url):
    clock = FakeClock()
    electors = [LeaderElector(Store(db_url), f"r{i}", clock) for i in range(6)]
    wins = []
    barrier = threading.Barrier(len(electors))

    def go(e):
        barrier.wait()
        try:
            if e.try_acquire():
                wins.append(e.replica_id)
        except Exception as ex:  # noqa: BLE001 - SQLite may refuse a concurrent writer: not a win
            wins.append(f"error {ex!r}") if "locked" not in str(ex) else None

    threads = [threading.Thread(target=go, args=(e,)) for e in electors]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len(wins) == 1 and not wins[0].startswith("error"), wins
        assert electors[0].store.lease().holder == wins[0]
    finally:
        for e in electors:
            e.store.close()


def test_service_loop_stops_when_fenced(tmp_path, db_url):
    from monitoring.gpu import FakeGpuReader
    from scheduler.executor import InMemoryExecutor
    from scheduler.inventory import Inventory, NodeInfo
    from scheduler.service import Service
    from scheduler.spec import ClusterConfig, TeamConfig

    clock = FakeClock()
    store = Store(db_url)
    elector = LeaderElector(store, "me", clock)
    assert elector.try_acquire()
    reader = FakeGpuReader(2)
    svc = Service(store, InMemoryExecutor(clock), Inventory(lambda: [NodeInfo("n1", "n1")], {"n1": reader}),
                  ClusterConfig(teams={"a": TeamConfig(gpus=2)}), clock, tmp_path)
    job = _submit(store)
    other = Store(db_url)
    try:
        clock.advance(60)
        assert LeaderElector(other, "usurper", clock).try_acquire()
        stop = threading.Event()
        t = threading.Thread(target=svc.run, args=(stop,))
        t.start()
        t.join(timeout=10)
        assert not t.is_alive(), "the fenced loop kept running"
        assert store.get(job.id).state is S.QUEUED  # it wrote nothing
    finally:
        other.close()
        store.close()
