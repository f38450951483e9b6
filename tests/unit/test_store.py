import threading

import pytest

from scheduler.lifecycle import IllegalTransition, JobState as S
from scheduler.store import Conflict, MemoryStore, Store, UnknownJob
from tests.reliability.db import db_url, pg_database, reset_pg, sqlalchemy_url  # noqa: F401 - fixtures


@pytest.fixture(params=["sqlite", "postgresql", "memory"])
def store(request, tmp_path):
    """Every store test runs against the SQL store on SQLite and on PostgreSQL, and against the
    in-memory implementation of the same interface (the simulator's)."""
    if request.param == "memory":
        s = MemoryStore()
    elif request.param == "sqlite":
        s = Store(f"sqlite:///{tmp_path / 'shoal.db'}")
    else:
        name = request.getfixturevalue("pg_database")
        reset_pg(name)
        s = Store(sqlalchemy_url(name))
    yield s
    s.close()


def submit(store, **kw):
    args = dict(spec={"name": "x"}, name="x", team="a", user="u", priority=0, gpus=1,
                memory_per_gpu_mib=1000, now=100.0)
    return store.submit(**{**args, **kw})


def test_transitions_write_history_in_order(store):
    job = submit(store)
    store.transition(job.id, S.QUEUED, S.ADMITTED, reason="placed", now=101, attempt=1,
                     placement={"node_id": "n", "gpu_indices": [0]})
    store.transition(job.id, S.ADMITTED, S.STARTING, reason="launched", now=102)
    store.transition(job.id, S.STARTING, S.RUNNING, reason="started", now=103)
    store.transition(job.id, S.RUNNING, S.SUCCEEDED, reason="done", now=104, result={"eval_loss": 1.0})
    ev = store.events(job.id)
    assert [(e.from_state, e.to_state, e.ts) for e in ev] == [
        (None, "QUEUED", 100), ("QUEUED", "ADMITTED", 101), ("ADMITTED", "STARTING", 102),
        ("STARTING", "RUNNING", 103), ("RUNNING", "SUCCEEDED", 104)]
    assert ev[1].attempt == 1 and store.get(job.id).result == {"eval_loss": 1.0}


def test_illegal_and_conflicting_transitions_change_nothing(store):
    job = submit(store)
    with pytest.raises(IllegalTransition):
        store.transition(job.id, S.QUEUED, S.RUNNING, reason="x", now=1)
    with pytest.raises(Conflict):
        store.transition(job.id, S.RUNNING, S.SUCCEEDED, reason="x", now=1)
    with pytest.raises(UnknownJob):
        store.transition(999, S.QUEUED, S.ADMITTED, reason="x", now=1)
    assert store.get(job.id).state is S.QUEUED and len(store.events(job.id)) == 1


def test_concurrent_writers_move_a_job_once(store):
    job = submit(store)
    wins, errors = [], []

    def worker(dst):
        try:
            store.transition(job.id, S.QUEUED, dst, reason=dst.value, now=2)
            wins.append(dst)
        except Conflict:
            errors.append(dst)

    threads = [threading.Thread(target=worker, args=(d,)) for d in [S.ADMITTED, S.CANCELLED] * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(errors) == 7
    assert len(store.events(job.id)) == 2


def test_state_survives_reopening(db_url):
    url = db_url
    s1 = Store(url)
    a = submit(s1)
    b = submit(s1, name="y")
    s1.transition(a.id, S.QUEUED, S.CANCELLED, reason="bye", now=3)
    s1.close()
    s2 = Store(url)
    assert [(j.name, j.state) for j in s2.jobs()] == [("x", S.CANCELLED), ("y", S.QUEUED)]
    assert s2.count_by_state_team() == {("CANCELLED", "a"): 1, ("QUEUED", "a"): 1}
    assert len(s2.events(b.id)) == 1


def test_only_known_fields_are_mutable(store):
    job = submit(store)
    with pytest.raises(ValueError, match="not a mutable job field"):
        store.update_fields(job.id, team="b")


def test_in_memory_store_is_one_database_for_all_threads():
    s = Store("sqlite://")
    job = submit(s)
    seen = []
    t = threading.Thread(target=lambda: seen.append(s.get(job.id).state))
    t.start()
    t.join()
    assert seen == [S.QUEUED]


def test_queries_filter_and_order_by_id(store):
    a, b, c = submit(store), submit(store, team="b"), submit(store)
    store.transition(a.id, S.QUEUED, S.ADMITTED, reason="placed", now=1, attempt=1)
    store.transition(a.id, S.ADMITTED, S.QUEUED, reason="lost", now=2, placement=None)  # re-enters QUEUED last
    store.request_cancel(c.id)
    assert [j.id for j in store.jobs(states=[S.QUEUED])] == [a.id, b.id, c.id]
    assert [j.id for j in store.jobs(states=[S.QUEUED], team="b")] == [b.id]
    assert [j.id for j in store.jobs(states=[S.QUEUED, S.ADMITTED], cancel_requested=True)] == [c.id]
    assert [j.id for j in store.jobs(states=[S.QUEUED], cancel_requested=False)] == [a.id, b.id]
    assert [j.id for j in store.jobs(limit=2)] == [a.id, b.id]
    store.transition(c.id, S.QUEUED, S.CANCELLED, reason="bye", now=3)
    assert store.jobs(states=[S.QUEUED, S.ADMITTED], cancel_requested=True) == []
    assert [j.id for j in store.jobs(cancel_requested=True)] == [c.id]
    assert store.active_jobs() == []
    assert store.count_by_state_team() == {("QUEUED", "a"): 1, ("QUEUED", "b"): 1, ("CANCELLED", "a"): 1}


def test_queued_versions_follow_every_change_in_id_order(store):
    """What the service reads every cycle: QUEUED jobs not being cancelled, in id order, with the
    columns that change while a job waits (the memory store keeps it as records change)."""
    a, b, c, d = submit(store), submit(store), submit(store), submit(store)
    assert list(store.queued_versions()) == [a.id, b.id, c.id, d.id]
    store.transition(a.id, S.QUEUED, S.ADMITTED, reason="placed", now=101, attempt=1)
    store.update_many({b.id: {"pending_reason": "waiting", "estimated_start_at": 500.0}})
    store.request_cancel(c.id)
    v = store.queued_versions()
    assert list(v) == [b.id, d.id] and v[b.id] == (100.0, 0, 0, 0.0, "waiting", 500.0)
    store.transition(a.id, S.ADMITTED, S.QUEUED, reason="requeued", now=102, attained_gpu_s=7.0)  # back, below b
    store.update_fields(d.id, pending_reason="later")
    v = store.queued_versions()
    assert list(v) == [a.id, b.id, d.id]
    assert v[a.id] == (102.0, 1, 0, 7.0, None, None) and v[d.id][4] == "later"
    store.transition(b.id, S.QUEUED, S.ADMITTED, reason="placed", now=103, attempt=1)
    assert list(store.queued_versions()) == [a.id, d.id]


def test_returned_records_do_not_alias_caller_dicts(store):
    placement = {"node_id": "n", "gpu_indices": [0]}
    job = submit(store)
    store.transition(job.id, S.QUEUED, S.ADMITTED, reason="placed", now=1, attempt=1, placement=placement)
    placement["gpu_indices"].append(1)
    assert store.get(job.id).placement == {"node_id": "n", "gpu_indices": [0]}
