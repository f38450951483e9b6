"""Usage ledger and accounting: what fair share, budgets, reports and cost metrics all read."""
import calendar
import math
from datetime import datetime

import pytest

from scheduler.accounting import (
    UsageRecord, charge_fraction, cost_usd, decayed_gpu_seconds, gpu_seconds, period_start, spend_by_team, summarize,
)
from scheduler.lifecycle import JobState as S

from tests.reliability.db import pg_database  # noqa: F401 - fixture (test_store's store uses it)
from tests.unit.test_store import store  # noqa: F401 - fixture
from tests.unit.test_service import World


def rec(job=1, team="a", user="u", gpus=1, frac=1.0, price=3.6, start=0.0, end=None, model="H100 80GB"):
    return UsageRecord(job, 1, team, user, model, "node-1", gpus, frac, price, start, end)


def test_gpu_seconds_and_cost_clip_to_the_window():
    r = rec(gpus=2, start=100.0, end=200.0, price=3.6)  # 3.6 $/GPU-h = 0.001 $/GPU-s
    assert gpu_seconds(r, 0, 1000) == 200.0
    assert gpu_seconds(r, 150, 1000) == 100.0
    assert gpu_seconds(r, 0, 120) == 40.0
    assert gpu_seconds(r, 300, 400) == 0.0
    assert cost_usd(r, 0, 1000) == pytest.approx(0.2)
    running = rec(start=100.0, end=None)
    assert gpu_seconds(running, 0, 160) == 60.0  # open attempts count up to `until`


def test_shared_gpus_are_charged_by_memory_share():
    assert charge_fraction(False, 20_000, 80_000) == 1.0
    assert charge_fraction(True, 20_000, 80_000) == 0.25
    assert charge_fraction(True, 90_000, 80_000) == 1.0
    assert cost_usd(rec(frac=0.25, start=0, end=3600, price=4.0), 0, 3600) == pytest.approx(1.0)


def test_summarize_groups_and_counts_distinct_jobs():
    rs = [rec(job=1, team="a", start=0, end=3600), rec(job=1, team="a", start=3600, end=7200),
          rec(job=2, team="b", gpus=4, start=0, end=1800, model="L4")]
    out = summarize(rs, ("team",), 0, 10_000)
    assert [(s.key, round(s.gpu_hours, 6), s.jobs) for s in out] == [({"team": "a"}, 2.0, 1), ({"team": "b"}, 2.0, 1)]
    by_model = {s.key["gpu_model"]: s.cost_usd for s in summarize(rs, ("gpu_model",), 0, 10_000)}
    assert by_model == pytest.approx({"H100 80GB": 7.2, "L4": 7.2})
    with pytest.raises(ValueError, match="by: unknown grouping"):
        summarize(rs, ("colour",), 0, 1)


def test_decayed_usage_halves_per_half_life():
    h = 1000.0
    recent = decayed_gpu_seconds([rec(start=9990, end=10_000)], now=10_000, half_life_s=h)["a"]
    old = decayed_gpu_seconds([rec(start=8990, end=9000)], now=10_000, half_life_s=h)["a"]
    assert recent == pytest.approx(10, rel=1e-2)
    assert old / recent == pytest.approx(0.5, rel=1e-2)
    # exact integral for a long interval: h/ln2 (1 - 2^-1) for one half-life of 1 GPU
    assert decayed_gpu_seconds([rec(start=9000, end=10_000)], 10_000, h)["a"] == pytest.approx(h / math.log(2) / 2)


def test_period_start_is_utc_calendar_boundary():
    now = calendar.timegm(datetime(2026, 11, 25, 14, 30).timetuple())  # a Wednesday
    assert period_start(now, "day") == calendar.timegm(datetime(2026, 11, 25).timetuple())
    assert period_start(now, "week") == calendar.timegm(datetime(2026, 11, 23).timetuple())
    assert period_start(now, "month") == calendar.timegm(datetime(2026, 11, 1).timetuple())


def test_store_ledger_opens_and_closes_with_the_attempt_in_one_transaction(store):
    """`store`: SQLite, PostgreSQL and the memory store (tests/unit/test_store.py's fixture)."""
    job = store.submit(spec={}, name="j", team="a", user="ann", priority=0, gpus=2, memory_per_gpu_mib=1, now=0.0)
    store.transition(job.id, S.QUEUED, S.ADMITTED, reason="r", now=10.0, attempt=1,
                     usage={"gpu_model": "L4", "node": "n", "gpus": 2, "gpu_fraction": 1.0, "price_per_gpu_hour": 1.0})
    store.transition(job.id, S.ADMITTED, S.STARTING, reason="r", now=11.0)
    (open_rec,) = store.usage()
    assert (open_rec.team, open_rec.user, open_rec.attempt, open_rec.started_at, open_rec.ended_at) == ("a", "ann", 1, 10.0, None)
    store.transition(job.id, S.STARTING, S.QUEUED, reason="r", now=50.0)
    (closed,) = store.usage()
    assert closed.ended_at == 50.0
    assert store.usage(since=60.0) == [] and store.usage(until=5.0) == []
    assert store.usage(team="b") == [] and store.usage(user="ann") == [closed]
    # `since` keeps open attempts and those closed after it, oldest first (the memory store
    # answers from its closing-order index while the clock only moves forward, and by a scan after
    # a record closes back in time)
    usage = {"gpu_model": "L4", "node": "n", "gpus": 1, "gpu_fraction": 1.0, "price_per_gpu_hour": 1.0}
    ids = [store.submit(spec={}, name=f"j{i}", team="a", user="ann", priority=0, gpus=1, memory_per_gpu_mib=1,
                        now=60.0).id for i in range(3)]
    for i in ids:
        store.transition(i, S.QUEUED, S.ADMITTED, reason="r", now=60.0, attempt=1, usage=usage)
    store.transition(ids[1], S.ADMITTED, S.QUEUED, reason="r", now=70.0)
    assert [u.job_id for u in store.usage(since=69.0)] == ids
    assert [u.job_id for u in store.usage(since=70.0)] == [ids[0], ids[2]]
    # opened_since: open records only when they started at or after it (TeamUsage's refresh)
    assert [u.job_id for u in store.usage(since=69.0, opened_since=61.0)] == [ids[1]]
    assert [u.job_id for u in store.usage(since=69.0, opened_since=60.0)] == ids
    assert [u.job_id for u in store.usage(opened_since=61.0)] == [job.id, ids[1]]
    store.transition(ids[0], S.ADMITTED, S.QUEUED, reason="r", now=65.0)  # a clock that went back
    assert [u.job_id for u in store.usage(since=64.0)] == ids
    assert [u.job_id for u in store.usage(since=66.0)] == ids[1:]
    # opened_since while records open in time order (the memory store reads the newest opened
    # only), then after one opened back in time (a writer's clock behind: it scans them all)
    late = [store.submit(spec={}, name=f"k{i}", team="a", user="ann", priority=0, gpus=1, memory_per_gpu_mib=1,
                         now=80.0).id for i in range(3)]
    store.transition(late[0], S.QUEUED, S.ADMITTED, reason="r", now=90.0, attempt=1, usage=usage)
    assert [u.job_id for u in store.usage(since=100.0, opened_since=90.0)] == [late[0]]
    assert [u.job_id for u in store.usage(since=100.0, opened_since=60.0)] == [ids[2], late[0]]
    store.transition(late[1], S.QUEUED, S.ADMITTED, reason="r", now=85.0, attempt=1, usage=usage)
    store.transition(late[2], S.QUEUED, S.ADMITTED, reason="r", now=95.0, attempt=1, usage=usage)
    assert [u.job_id for u in store.usage(since=100.0, opened_since=88.0)] == [late[0], late[2]]
    assert [u.job_id for u in store.usage(since=100.0, opened_since=85.0)] == late


def test_service_charges_price_times_time_and_feeds_the_policy(tmp_path):
    w = World(tmp_path, quotas={"a": 4, "b": 4})
    w.config.gpu_models["H100 80GB"] = w.config.gpu_models["H100 80GB"].model_copy(update={"price_per_hour": 3.6})
    w.service.views.usage_refresh_s = 0.0
    t0 = w.clock.now()
    w.submit(team="a", gpus=2, duration=10)
    w.run(20)
    (r,) = w.store.usage()
    assert r.ended_at is not None and r.gpu_model == "H100 80GB" and r.price_per_gpu_hour == 3.6
    held = r.ended_at - r.started_at
    assert 10 <= held <= 12
    assert spend_by_team([r], t0, w.clock.now()) == pytest.approx({"a": 2 * held * 0.001})
    quotas = {q.team: q for q in w.service.views.quotas()}
    assert quotas["a"].spent_usd == pytest.approx(2 * held * 0.001)
    assert quotas["a"].usage_gpu_s == pytest.approx(2 * held, rel=1e-3) and quotas["b"].usage_gpu_s == 0.0


def test_team_usage_refreshes_one_thread_at_a_time(tmp_path):
    """The loop, API requests and the cost metrics' scrape call StoreViews.team_usage from their
    own threads. TeamUsage.refresh adds each attempt that closed since its last refresh to sums it
    keeps; two refreshes at once could both add it. So refreshes run one at a time (two at once
    would meet inside the ledger read below), and each returns the ledger's sums."""
    import threading

    from scheduler.snapshot import StoreViews

    w = World(tmp_path, quotas={"a": 4, "b": 4})
    w.submit(team="a", gpus=2, duration=10)
    w.run(20)
    (r,) = w.store.usage()
    assert r.ended_at is not None
    read, inside, most = w.store.usage, [0], [0]
    meet = threading.Barrier(2, timeout=1.0)

    def usage(since=None, opened_since=None):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        try:
            meet.wait()  # a second refresh running at the same time arrives here too
        except threading.BrokenBarrierError:
            pass  # it did not (one second): refreshes are serialized
        try:
            return read(since=since, opened_since=opened_since)
        finally:
            inside[0] -= 1

    w.store.usage = usage
    views = StoreViews(w.store, w.service.nodes, w.config, w.clock)  # a fresh ledger: both refreshes read
    views.usage_refresh_s = 0.0
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(views.team_usage())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert most[0] == 1
    w.store.usage = read
    alone = StoreViews(w.store, w.service.nodes, w.config, w.clock).team_usage()
    assert alone[0]["a"] > 0 and results == [alone, alone]


def test_incremental_team_usage_equals_a_full_recount_of_the_ledger():
    """TeamUsage carries closed attempts forward instead of re-reading the ledger: at every
    refresh it must equal decayed_gpu_seconds + spend_by_team over the whole ledger, including
    attempts that close at the very instant of a refresh or open just before it (open attempts
    are kept as closed-form sums; a refresh reads only what was opened or closed since the last
    one), across a budget-period boundary."""
    import random

    from scheduler.accounting import TeamUsage

    rng = random.Random(4)
    h = 3 * 86400.0
    t = calendar.timegm((2026, 3, 30, 12, 0, 0))  # two days before a month starts
    ledger: list[UsageRecord] = []
    open_: dict[int, int] = {}

    def read(since, opened_since):  # Store.usage(since=, opened_since=)
        return [r for r in ledger if (r.ended_at is None and (opened_since is None or r.started_at >= opened_since))
                or (r.ended_at is not None and (since is None or r.ended_at > since))]

    usage = TeamUsage(read, h, "month", full_every_s=10 * 86400.0)
    for step in range(600):
        t += rng.choice([0.0, 0.5, 30.0, 600.0, 3600.0])  # repeated instants included
        for job in [j for j in list(open_) if rng.random() < 0.15]:
            i = open_.pop(job)
            r = ledger[i]
            ledger[i] = UsageRecord(r.job_id, r.attempt, r.team, r.user, r.gpu_model, r.node, r.gpus,
                                    r.gpu_fraction, r.price_per_gpu_hour, r.started_at, t)
        if rng.random() < 0.3:
            job = len(ledger) + 1
            open_[job] = len(ledger)
            ledger.append(rec(job=job, team=rng.choice("abc"), gpus=rng.choice([1, 2, 8]),
                              frac=rng.choice([1.0, 0.25]), start=t - rng.choice([0.0, 0.0, 0.4])))
        decayed, spent = usage.refresh(t)
        want_d = decayed_gpu_seconds(ledger, t, h)
        want_s = spend_by_team(ledger, period_start(t, "month"), t)
        for team in set(want_d) | set(decayed):
            assert decayed.get(team, 0.0) == pytest.approx(want_d.get(team, 0.0), rel=1e-9, abs=1e-6), (step, team)
        for team in set(want_s) | set(spent):
            assert spent.get(team, 0.0) == pytest.approx(want_s.get(team, 0.0), rel=1e-9, abs=1e-9), (step, team)
    assert t > calendar.timegm((2026, 4, 1, 0, 0, 0)) and len(ledger) > 100
