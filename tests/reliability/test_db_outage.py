"""PostgreSQL briefly unreachable (its connections cut and refused for a few seconds, through a
TCP proxy the test controls): the service loop keeps running, retries, writes nothing half-way,
and catches up: every job finishes, each attempt launched once, every job's history a legal
chain of transitions."""
from __future__ import annotations

import logging
import threading
import time

from monitoring.gpu import FakeGpuReader
from scheduler.clock import WallClock
from scheduler.executor import InMemoryExecutor
from scheduler.inventory import Inventory, NodeInfo
from scheduler.lifecycle import TRANSITIONS, JobState as S
from scheduler.service import Service
from scheduler.spec import ClusterConfig, SchedulerSettings, TeamConfig
from scheduler.store import Store
from tests.reliability.db import PG_SERVER, pg_database, reset_pg, sqlalchemy_url  # noqa: F401 - fixtures
from tests.reliability.proxy import TcpProxy


def test_service_rides_out_a_database_outage(tmp_path, pg_database, caplog):
    import psycopg

    caplog.set_level(logging.ERROR, logger="shoal.service")
    reset_pg(pg_database)
    info = psycopg.conninfo.conninfo_to_dict(PG_SERVER)
    proxy = TcpProxy((info.get("host", "127.0.0.1"), int(info.get("port", 5432))))
    port = proxy.start()
    url = sqlalchemy_url(pg_database).replace(f":{info.get('port', 5432)}/", f":{port}/")
    store = Store(url)
    clock = WallClock()
    executor = InMemoryExecutor(clock, duration_s=lambda spec: spec["duration"])
    config = ClusterConfig(teams={"a": TeamConfig(gpus=2)}, scheduler=SchedulerSettings(interval_s=0.1))
    svc = Service(store, executor, Inventory(lambda: [NodeInfo("n1", "n1")], {"n1": FakeGpuReader(2)}), config,
                  clock, tmp_path)
    ids = [store.submit(spec={"name": f"j{i}", "duration": 1.0, "max_retries": 0}, name=f"j{i}", team="a",
                        user="u", priority=0, gpus=1, memory_per_gpu_mib=100, now=clock.now()).id for i in range(8)]
    stop = threading.Event()
    loop = threading.Thread(target=svc.run, args=(stop,), daemon=True)
    loop.start()
    try:
        time.sleep(1.5)
        proxy.stop()  # the database goes away mid-run: open connections cut, new ones refused
        time.sleep(3.0)
        assert loop.is_alive()
        failed_cycles = sum("scheduler cycle failed" in r.getMessage() for r in caplog.records)
        assert failed_cycles >= 1  # the outage was felt
        proxy.start()  # back on the same port
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(store.get(i).state.terminal for i in ids):
            time.sleep(0.3)
        assert loop.is_alive()
    finally:
        stop.set()
        loop.join(timeout=10)
        proxy.stop()
    check = Store(sqlalchemy_url(pg_database))
    try:
        jobs = [check.get(i) for i in ids]
        assert [j.state for j in jobs] == [S.SUCCEEDED] * len(ids), [(j.id, j.state) for j in jobs]
        assert sorted(executor.launches) == sorted(set(executor.launches))  # no attempt launched twice
        for j in jobs:
            ev = check.events(j.id)
            assert ev[0].to_state == "QUEUED"
            for prev, cur in zip(ev, ev[1:]):
                assert cur.from_state == prev.to_state and S(cur.to_state) in TRANSITIONS[S(prev.to_state)], ev
            assert j.placement is None
    finally:
        check.close()
        store.close()
