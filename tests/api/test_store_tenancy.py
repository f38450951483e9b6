"""Store-level behaviour behind the API: group-committed submissions and idempotency keys (also
when another writer wins a race on a key), team overrides over the config."""
from __future__ import annotations

import pytest

from scheduler.spec import ClusterConfig, TeamConfig
from scheduler.store import IdempotencyMismatch, Store


def _item(name: str, idem=None, **kw) -> dict:
    return dict(spec={"name": name}, name=name, team="a", user="u", priority=0, gpus=1, memory_per_gpu_mib=10,
                now=100.0, reason="submitted", **({"idem": idem} if idem else {}), **kw)


@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    yield s
    s.close()


def test_submit_many_commits_a_batch_with_keys_duplicates_and_mismatches(store):
    first, _ = store.submit_idempotent(key_owner="u", key="old", request_digest="d0", **{
        k: v for k, v in _item("old").items()})
    out = store.submit_many([
        _item("x"),  # no key
        _item("y", ("u", "k1", "d1")),  # new key
        _item("y2", ("u", "k1", "d1")),  # the same key again in this batch, same body: the same job
        _item("z", ("u", "k1", "dX")),  # the same key, another body: refused
        _item("o", ("u", "old", "d0")),  # a key committed before: that job
        _item("p", ("u", "old", "zz")),  # ... with another body: refused
        _item("q", ("v", "k1", "d1")),  # another user's k1: independent
    ])
    (x, cx), (y, cy), (y2, cy2), z, (o, co), p, (q, cq) = out
    assert (cx, cy, cy2, co, cq) == (True, True, False, False, True)
    assert y2.id == y.id and o.id == first.id and q.id not in (y.id, x.id)
    assert isinstance(z, IdempotencyMismatch) and isinstance(p, IdempotencyMismatch)
    assert [j.name for j in store.jobs()] == ["old", "x", "y", "q"]
    assert [e.to_state for e in store.events(y.id)] == ["QUEUED"]
    assert y.spec == {"name": "y"} and y.state.value == "QUEUED"


def test_submit_many_falls_back_when_another_writer_took_a_key(store, monkeypatch):
    """Two server processes race on one key: the batch that loses the primary-key race is
    retried one submission at a time and answers with the winner's job."""
    winner, _ = store.submit_idempotent(key_owner="u", key="k", request_digest="d", **_item("w"))
    import scheduler.store.tenancy as t

    real = t.select
    calls = {"n": 0}

    def blind_select(*cols):  # the batch's first look-up of existing keys sees none (the race)
        q = real(*cols)
        if cols and getattr(cols[0], "key", None) == "user" and calls["n"] == 0:
            calls["n"] += 1
            return q.where(t.IdempotencyRow.key == "never")
        return q

    monkeypatch.setattr(t, "select", blind_select)
    out = store.submit_many([_item("a"), _item("b", ("u", "k", "d"))])
    assert calls["n"] == 1
    (a, ca), (b, cb) = out
    assert ca and not cb and b.id == winner.id
    assert [j.name for j in store.jobs()] == ["w", "a"]  # the failed batch left nothing behind


def test_team_configs_apply_db_rows_over_the_config(store):
    config = ClusterConfig(teams={"a": TeamConfig(gpus=2), "b": TeamConfig(gpus=1)})
    assert store.seed_tenancy(config, 1.0) is True and store.seed_tenancy(config, 2.0) is False
    store.put_team("a", TeamConfig(gpus=5), 3.0)
    store.delete_team("b", 3.0)
    store.put_team("c", TeamConfig(gpus=1), 3.0)
    assert {n: t.gpus for n, t in store.team_configs(config).items()} == {"a": 5, "c": 1}


def test_the_batcher_groups_concurrent_submissions_and_answers_each(store):
    """32 threads submit 320 jobs through SubmitBatcher: every one gets its own job, the store
    holds exactly those, the loop is handed each new job once, and concurrency turns the
    submissions into far fewer transactions than jobs (group commit with a short linger)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from scheduler.api import SubmitBatcher

    sizes, handed, lock = [], [], threading.Lock()

    class Counting:  # the real store, counting its transactions
        def submit_many(self, items):
            with lock:
                sizes.append(len(items))
            return store.submit_many(items)

    batcher = SubmitBatcher(Counting(), on_created=handed.extend)
    with ThreadPoolExecutor(32) as ex:
        results = list(ex.map(lambda i: batcher.submit(_item(f"j{i}", ("u", f"k{i}", "d"))), range(320)))
    ids = [job.id for job, created in results]
    assert all(created for _, created in results) and len(set(ids)) == 320
    assert sorted(j.id for j in store.jobs()) == sorted(ids)
    assert sorted(j.id for j in handed) == sorted(ids)
    assert sum(sizes) == 320 and len(sizes) < 160 and max(sizes) > 2
