"""Invariants of the policy over random clusters and queues (hypothesis)."""
from __future__ import annotations

import math
from collections import defaultdict

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler.policy import Cohort, JobRequest, RunningJob, Snapshot, TeamQuota, schedule
from scheduler.policy.quota import QuotaBook
from scheduler.policy.shoal import plan
from scheduler.policy.types import PolicySettings
from tests.unit.policy_builders import A100, H100, L4, MEM, NOW, node, overlay

MODELS = [H100, A100, L4]
TEAMS = ["a", "b", "c", "d"]


@st.composite
def snapshots(draw) -> Snapshot:
    nodes = []
    for n in range(draw(st.integers(1, 5))):
        gpus = draw(st.integers(1, 8))
        model = draw(st.sampled_from(MODELS))
        foreign = draw(st.dictionaries(st.integers(0, gpus - 1), st.integers(0, MEM[model]), max_size=3))
        util = draw(st.dictionaries(st.integers(0, gpus - 1), st.floats(0, 1), max_size=3))
        unhealthy = tuple(draw(st.sets(st.integers(0, gpus - 1), max_size=2)))
        nodes.append(node(f"n{n}", gpus, model, foreign, util, unhealthy, schedulable=draw(st.booleans()) or n == 0,
                          cpus=draw(st.sampled_from([None, None, 8, 16]))))
    cohorts = [Cohort("root"), Cohort("x", "root"), Cohort("y", "root"), Cohort("solo")]
    teams = [TeamQuota(t, draw(st.integers(1, 8)), (), draw(st.sampled_from([None, "x", "y", "solo"])),
                       draw(st.sampled_from([None, 0, 2, 4])), draw(st.sampled_from([None, 0, 2])),
                       draw(st.sampled_from([1.0, 2.0])), draw(st.sampled_from([0.0, 1e5])),
                       draw(st.sampled_from([None, 10.0])), draw(st.sampled_from([0.0, 20.0])))
             for t in TEAMS[:draw(st.integers(1, 4))]]
    names = [t.team for t in teams]
    # running jobs on free GPUs, exclusive or shareable
    running: list[RunningJob] = []
    jid = 1000
    for nv in nodes:
        for g in nv.gpus:
            kind = draw(st.sampled_from(["free", "free", "excl", "share", "share2"]))
            if kind == "free":
                continue
            tenants = 2 if kind == "share2" else 1
            for _ in range(tenants):
                jid += 1
                end = draw(st.sampled_from([None, NOW + 300, NOW + 3000]))
                running.append(RunningJob(jid, draw(st.sampled_from(names)), draw(st.integers(0, 2)), nv.node_id,
                                          (g.index,), draw(st.sampled_from([2000, 8000])), cpus=1,
                                          started_at=NOW - draw(st.sampled_from([10, 1000, 5000])),
                                          expected_end_at=end, shareable=kind != "excl",
                                          stopping=draw(st.booleans()) and draw(st.booleans())))
    pending = tuple(
        JobRequest(i, draw(st.sampled_from(names + ["zz"])), draw(st.integers(0, 2)), NOW - draw(st.integers(0, 8000)),
                   draw(st.sampled_from([1, 1, 1, 2, 2, 3, 4, 8])), draw(st.sampled_from([1000, 5000, 20000, 39000, 70000])),
                   draw(st.sampled_from([None, None, *MODELS])), draw(st.sampled_from([1, 2])),
                   shareable=draw(st.booleans()), expected_duration_s=draw(st.sampled_from([None, 100.0, 5000.0])),
                   attained_gpu_s=draw(st.sampled_from([0.0, 5000.0])))
        for i in range(1, draw(st.integers(0, 25)) + 1))
    s = PolicySettings(multi_node=draw(st.booleans()), las_preempt_factor=draw(st.sampled_from([0.0, 2.0])),
                       over_budget=draw(st.sampled_from(["no-borrowing", "none"])),
                       defrag_factor=draw(st.sampled_from([0.0, 2.0])))
    return Snapshot(overlay(nodes, running), tuple(running), pending, tuple(teams), 1024, now=NOW,
                    cohorts=tuple(cohorts), settings=s)


def _gpus(snap):
    return {(n.node_id, g.index): (n, g) for n in snap.nodes for g in n.gpus}


PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(snapshots())
def test_starts_respect_memory_health_exclusivity_and_gangs(snap):
    d = schedule(snap)
    gpus = _gpus(snap)
    req = {j.job_id: j for j in snap.pending}
    shareable = {r.job_id: r.shareable for r in snap.running}
    new_mem: dict = defaultdict(int)
    new_on: dict = defaultdict(list)
    for s in d.to_start:
        j = req[s.job_id]
        parts = s.placement.all_parts()
        assert (s.placement.node_id, s.placement.gpu_indices) == parts[0]
        flat = [(n, i) for n, ix in parts for i in ix]
        assert len(flat) == len(set(flat)) == j.gpus  # all GPUs at once
        assert len({gpus[k][1].model for k in flat}) == 1  # one flavor
        if j.gpu_model:
            assert gpus[flat[0]][1].model == j.gpu_model
        if not snap.settings.multi_node:
            assert len(parts) == 1
        for k in flat:
            n, g = gpus[k]
            assert n.schedulable and g.healthy
            new_mem[k] += j.memory_per_gpu_mib
            new_on[k].append(j)
    for k, mem in new_mem.items():
        n, g = gpus[k]
        assert mem <= g.free_mib(snap.memory_headroom_mib)  # never over-committed, foreign use included
        tenants = [shareable[t] for t in g.allocated_to] + [j.shareable for j in new_on[k]]
        assert len(tenants) == 1 or all(tenants)  # exclusive jobs alone


@PROPS
@given(snapshots())
def test_no_team_above_nominal_plus_borrowing_limit(snap):
    d = schedule(snap)
    book = QuotaBook(snap.quotas, snap.cohorts)
    gpus = _gpus(snap)
    req = {j.job_id: j for j in snap.pending}
    added: dict = defaultdict(float)
    held: dict = defaultdict(float)
    for r in snap.running:
        model = gpus[(r.node_id, r.gpu_indices[0])][1].model
        held[(r.team, book.key(r.team, model))] += (r.memory_per_gpu_mib / MEM[model]) if r.shareable else 1
    for s in d.to_start:
        j = req[s.job_id]
        model = gpus[(s.placement.node_id, s.placement.gpu_indices[0])][1].model
        added[(j.team, book.key(j.team, model))] += (j.gpus * min(1, j.memory_per_gpu_mib / MEM[model])
                                                      if j.shareable else j.gpus)
        assert j.team in book.teams
    for (team, key), a in added.items():
        q = book.teams[team]
        limit = book.nominal(team, key)
        if q.cohort is not None:
            limit += math.inf if q.borrowing_limit is None else q.borrowing_limit
        assert held[(team, key)] + a <= max(limit, held[(team, key)]) + 1e-6
        if q.budget_usd is not None and q.spent_usd >= q.budget_usd:
            assert held[(team, key)] + a <= max(book.nominal(team, key), held[(team, key)]) + 1e-6
            assert snap.settings.over_budget != "none"


@PROPS
@given(snapshots())
def test_backfill_never_delays_the_reservation(snap):
    d, res = plan(snap)
    if not res:
        return
    at = res[0][2]
    reserved = {(n, i) for n, ix, _, _ in res for i in ix}
    req = {j.job_id: j for j in snap.pending}
    for s in d.to_start:
        used = {(n, i) for n, ix in s.placement.all_parts() for i in ix}
        if used & reserved:  # only a job that ends by the reserved start may use those GPUs
            dur = req[s.job_id].expected_duration_s
            assert (math.inf if dur is None else snap.now + dur) <= at


@PROPS
@given(snapshots(), st.randoms(use_true_random=False))
def test_same_snapshot_same_decision_and_every_job_accounted(snap, rnd):
    d = schedule(snap)
    assert d == schedule(snap)
    shuffled = list(snap.pending)
    rnd.shuffle(shuffled)
    assert schedule(Snapshot(snap.nodes, snap.running, tuple(shuffled), snap.quotas, snap.memory_headroom_mib,
                             snap.now, snap.cohorts, snap.settings)) == d
    starts = {s.job_id for s in d.to_start}
    assert starts.isdisjoint(d.pending) and starts | set(d.pending) == {j.job_id for j in snap.pending}
    assert all(isinstance(v, str) and v for v in d.pending.values())
    running = {r.job_id: r for r in snap.running}
    for p in d.to_preempt:
        r = running[p.job_id]
        assert r.preemptible and not r.stopping and snap.now - r.started_at >= snap.settings.min_runtime_s
    assert len({p.job_id for p in d.to_preempt}) == len(d.to_preempt)


def _cluster_fields(c):
    return ([vars(u) for u in c.units], {f: vars(fl) for f, fl in c.flavors.items()}, c.cpus_free, c.node_cpus,
            {f: [list(d) for d in b] for f, b in c.buckets.items()}, c.shared, c.shared_slot, c.free_total, c.by_gpu)


@PROPS
@given(snapshots(), st.data())
def test_a_patched_cluster_equals_one_built_from_scratch(first, data):
    """The policy keeps the last cluster it built and patches in the nodes whose view changed
    (cluster._Base). After a random change - per node: the same view object, or its GPUs'
    health, foreign memory, utilization, schedulability, free CPUs and Shoal tenants redrawn -
    the patched cluster is the one a build from scratch gives, orders included."""
    from dataclasses import replace

    import scheduler.policy.cluster as cluster_mod
    from scheduler.policy.cluster import Cluster

    cluster_mod._BASE.clear()
    Cluster(first, {r.job_id: r for r in first.running})  # the base to patch
    nodes = []
    for n in first.nodes:
        if data.draw(st.booleans()):
            nodes.append(n)  # unchanged: the same object
            continue
        gpus = tuple(replace(g, healthy=data.draw(st.booleans()) or g.index % 2 == 0,
                             memory_used_mib=data.draw(st.integers(0, g.memory_total_mib)),
                             utilization=data.draw(st.sampled_from([0.0, 0.4, 0.9])),
                             allocated_to=data.draw(st.sampled_from([(), g.allocated_to, (1001,), (1001, 1002)])))
                     for g in n.gpus)
        nodes.append(replace(n, gpus=gpus, schedulable=data.draw(st.booleans()),
                             cpus_held=data.draw(st.integers(0, 4)) if n.cpus else 0))
    second = replace(first, nodes=tuple(nodes))
    tenants = {r.job_id: r for r in second.running}
    share, cluster_mod.PATCH_MAX_SHARE = cluster_mod.PATCH_MAX_SHARE, 1.0  # patch however many changed
    try:
        patched = _cluster_fields(Cluster(second, tenants))
    finally:
        cluster_mod.PATCH_MAX_SHARE = share
    cluster_mod._BASE.clear()
    assert patched == _cluster_fields(Cluster(second, tenants))
