"""Two scheduler replicas on PostgreSQL and one Ray cluster: exactly one leads (the lease), the
other serves the read API; SIGKILL the leader and the follower takes over within 15 s, adopts
the runs the dead leader launched, and finishes every job with none run twice."""
from __future__ import annotations

import secrets
import time

import pytest

from benchmarks.chaos import Scheduler, job_spec, ledger_check, start_cluster, write_config
from scheduler.client import Client
from scheduler.store import Store
from tests.reliability.db import pg_database, reset_pg, sqlalchemy_url  # noqa: F401 - fixtures

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(1200)]


def test_leader_killed_follower_takes_over_within_15s(tmp_path, pg_database, tiny_model_dir):
    import ray

    reset_pg(pg_database)
    url = sqlalchemy_url(pg_database)
    cluster = start_cluster(4)
    ray.init(address=cluster.address, namespace="shoal-test", log_to_driver=False)
    config = write_config(tmp_path / "cluster.yaml", 4)
    homes = [tmp_path / "a", tmp_path / "b"]
    for h in homes:
        h.mkdir()
    secret = secrets.token_hex(16)  # replicas sharing a database share the server secret
    a = Scheduler(homes[0], cluster.address, config, db=url, extra=["--replica-id", "a", "--lease-ttl", "8"],
                  secret=secret)
    b = Scheduler(homes[1], cluster.address, config, db=url, extra=["--replica-id", "b", "--lease-ttl", "8"],
                  secret=secret)
    store = Store(url)
    try:
        leader = a.start()
        follower = b.start()
        assert store.lease().holder == "a"
        ids = [leader.submit(job_spec(i, steps=30), source=f"ha-{i}").id for i in range(10)]
        assert [j.id for j in follower.jobs()] == ids  # the follower serves reads
        # one secret: a token the leader wrote is honoured by the follower (and after fail-over)
        assert [j.id for j in Client(follower.url, token=leader.token).jobs()] == ids
        deadline = time.monotonic() + 300
        while sum(store.get(i).state.value == "RUNNING" for i in ids) < 2:
            assert time.monotonic() < deadline, a.log()[-3000:]
            time.sleep(0.3)
        a.kill()
        killed_at = time.monotonic()
        while store.lease().holder != "b":
            assert time.monotonic() - killed_at < 30, b.log()[-3000:]
            time.sleep(0.2)
        takeover_s = time.monotonic() - killed_at
        print(f"takeover after {takeover_s:.1f} s")
        assert takeover_s <= 15, takeover_s
        assert store.lease().token == 2
        while not all(store.get(i).state.terminal for i in ids):
            assert time.monotonic() < deadline + 300, b.log()[-3000:]
            time.sleep(0.5)
        assert [store.get(i).state.value for i in ids] == ["SUCCEEDED"] * len(ids)
        double, twice, details = ledger_check(homes, ids)
        assert double == 0 and twice == 0, details
        assert "adopting job" in b.log()
    finally:
        store.close()
        b.stop()
        a.stop()
        ray.shutdown()
        cluster.shutdown()
