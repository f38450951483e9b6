"""Table tests of the Shoal policy, one named case per rule (builders in policy_builders.py)."""
import pytest

from scheduler.policy import JobRequest, NodeView, TeamQuota, never_fits, schedule
from tests.unit.policy_builders import A100, H100, L4, NOW, job, node, run, snap, started, team


# -- quota, borrowing, lending, cohorts -------------------------------------------------------

def test_quota_keeps_job_pending_with_reason():
    d = schedule(snap([node("n1")], [job(2, gpus=2)], [run(1, "n1", (0, 1, 2))], teams=[team("a", 4)]))
    assert d.to_start == ()
    assert d.pending[2] == "waiting for quota: team a uses 3/4 GPUs, job needs 2; no cohort to borrow from"


QUOTA_CASES = {
    # name: (teams, cohorts, running, job, started?, reason fragment)
    "borrows idle quota of its cohort": (
        [team("a", 2, cohort="c"), team("b", 6, cohort="c")], ["c"], [], job(1, gpus=4), True, None),
    "borrowing limit": (
        [team("a", 2, cohort="c", borrow=1), team("b", 6, cohort="c")], ["c"], [run(9, "n1", (0, 1))],
        job(1, gpus=2), False,
        "borrowing 2 would pass its borrowing limit of 1"),
    "lending limit keeps the rest for the lender": (
        [team("a", 2, cohort="c"), team("b", 6, cohort="c", lend=1)], ["c"], [], job(1, gpus=4), False,
        "infeasible"),  # a may hold at most 2 + 1
    "cohort has nothing to lend": (
        [team("a", 2, cohort="c"), team("b", 4, cohort="c")], ["c"],
        [run(9, "n1", (0, 1, 2, 3), team="b")], job(1, gpus=3), False,
        "waiting for quota: team a uses 0/2 GPUs, job needs 3; cohort c has 0 to lend"),
    "no cohort, no borrowing": (
        [team("a", 2), team("b", 6)], [], [], job(1, gpus=3), False, "infeasible"),
    "hierarchical: borrows from a sibling cohort under the same parent": (
        [team("a", 2, cohort="left"), team("b", 6, cohort="right")], [("left", "root"), ("right", "root"), "root"],
        [], job(1, gpus=5), True, None),
    "separate trees do not lend": (
        [team("a", 2, cohort="left"), team("b", 6, cohort="right")], ["left", "right"], [], job(1, gpus=3),
        False, "infeasible"),
}


@pytest.mark.parametrize("name", QUOTA_CASES)
def test_quota_table(name):
    teams, cohorts, running, j, ok, why = QUOTA_CASES[name]
    d = schedule(snap([node("n1")], [j], running, teams=teams, cohorts=cohorts))
    assert (j.job_id in started(d)) == ok, d.pending
    if why:
        assert why in d.pending[j.job_id]


def test_lender_demand_is_not_lent_away():
    # b has a waiting within-nominal job: its idle nominal is claimed, a cannot borrow it.
    teams = [team("a", 2, cohort="c"), team("b", 6, cohort="c")]
    d = schedule(snap([node("n1", gpus=8), node("n2", gpus=2)],
                      [job(1, team="a", gpus=4, t=NOW - 500), job(2, team="b", gpus=6, t=NOW - 1)],
                      teams=teams, cohorts=["c"]))
    assert set(started(d)) == {2}
    assert "cohort c has 0 to lend" in d.pending[1]


def test_per_flavor_nominal():
    teams = [team("a", 0, by_flavor={H100: 2}, cohort="c"), team("b", 0, by_flavor={L4: 4}, cohort="c")]
    nodes = [node("h", 4), node("l", 4, model=L4)]
    d = schedule(snap(nodes, [job(1, model=H100, gpus=2), job(2, model=L4, gpus=2, mem=5000)], teams=teams,
                      cohorts=["c"]))
    assert started(d)[1][0] == "h" and started(d)[2][0] == "l"  # L4 borrowed from b
    d = schedule(snap(nodes, [job(1, model=H100, gpus=3)], teams=teams, cohorts=["c"]))
    assert "may hold at most 2 H100 80GB GPUs" in d.pending[1]


# -- order -------------------------------------------------------------------------------------

def test_priority_then_submit_time_decides_who_gets_the_last_gpu():
    d = schedule(snap([node("n1", gpus=1)], [job(1, t=1), job(2, t=2, prio=5), job(3, t=0.5)]))
    assert list(started(d)) == [2]
    # equal priority and no duration or attained service: earliest submitted (aged FIFO) first
    d = schedule(snap([node("n1", gpus=1)], [job(1, t=NOW - 10), job(3, t=NOW - 20)]))
    assert list(started(d)) == [3]


def test_shortest_remaining_work_first_within_a_team():
    pend = [job(1, dur=3600), job(2, dur=60), job(3, dur=600)]
    d = schedule(snap([node("n1", gpus=1)], pend))
    assert list(started(d)) == [2]


def test_makespan_guard_starts_a_job_that_would_end_after_everything_else():
    """A job longer than the backlog's drain time (12.5 GPU-h over 2 GPUs = 6.25 h) sets the
    makespan: it goes ahead of shorter work. Short jobs that fit in the drain time do not."""
    running = [run(9, "n1", (0,), end=NOW + 3600)]
    pend = [job(1, dur=10 * 3600), job(2, dur=1800), job(3, dur=1800), job(4, dur=1800)]
    assert list(started(schedule(snap([node("n1", gpus=2)], pend, running)))) == [1]
    assert list(started(schedule(snap([node("n1", gpus=2)], pend, running, makespan_guard=False)))) == [2]
    pend = [job(1, dur=2 * 3600), job(2, dur=1800), job(3, dur=1800), job(4, dur=1800)]  # 2 h < 4.5 GPU-h / 2
    assert list(started(schedule(snap([node("n1", gpus=2)], pend, running)))) == [2]


def test_least_attained_service_when_duration_unknown():
    pend = [job(1, attained=5000), job(2, attained=10)]
    assert list(started(schedule(snap([node("n1", gpus=1)], pend)))) == [2]


def test_aging_bounds_the_wait_of_a_long_job():
    # horizon = aging_s (1 h) + aging_ratio (2 here; 16 by default) x 10 h = 21 h
    old = job(1, dur=10 * 3600, t=NOW - 20 * 3600)
    d = schedule(snap([node("n1", gpus=1)], [old, job(2, dur=60, t=NOW - 5)], aging_ratio=2))
    assert list(started(d)) == [2]  # not yet past its horizon: the short job goes first
    old = job(1, dur=10 * 3600, t=NOW - 21 * 3600)
    d = schedule(snap([node("n1", gpus=1)], [old, job(2, dur=60, t=NOW - 5)], aging_ratio=2))
    assert list(started(d)) == [1]
    # the default 16: 1 h + 160 h
    assert list(started(schedule(snap([node("n1", gpus=1)], [old, job(2, dur=60, t=NOW - 5)])))) == [2]
    old = job(1, dur=10 * 3600, t=NOW - 161 * 3600)
    assert list(started(schedule(snap([node("n1", gpus=1)], [old, job(2, dur=60, t=NOW - 5)])))) == [1]
    # without durations: attained GPU-s per GPU sets the horizon; a fresh job (0 attained) ages in aging_s
    d = schedule(snap([node("n1", gpus=1)], [job(1, attained=3600, t=NOW - 3 * 3600 - 1), job(2, t=NOW - 5)],
                      aging_ratio=2))
    assert list(started(d)) == [1]


def test_fair_share_between_teams_before_job_length():
    # team a already holds 6 of 8 GPUs; b holds none: b's long job beats a's short job.
    running = [run(i, "n1", (i,), team="a") for i in range(6)]
    d = schedule(snap([node("n1")], [job(10, team="a", dur=60), job(11, team="b", dur=36000)], running,
                      teams=[team("a", 8, cohort="c"), team("b", 8, cohort="c")], cohorts=["c"]))
    assert list(started(d))[0] == 11


def test_weights_and_history_shift_fair_share():
    teams = [team("a", 8, weight=1, usage=0), team("b", 8, weight=1, usage=1e6)]
    d = schedule(snap([node("n1", gpus=1)], [job(1, team="a", dur=600), job(2, team="b", dur=60)], teams=teams))
    assert list(started(d)) == [1]  # b used a lot recently: a first despite the longer job


# -- gang placement and packing ---------------------------------------------------------------

def test_gang_is_all_or_nothing_on_one_node_and_best_fit():
    busy = [run(100 + i, "n1", (i,), team="b") for i in range(5)]
    nodes = [node("n1"), node("n2")]
    d = schedule(snap(nodes, [job(1, gpus=2)], busy))
    assert started(d)[1] == ("n1", (5, 6))  # the partly used node, keeping n2 whole
    d = schedule(snap(nodes, [job(2, gpus=4)], busy))
    assert started(d)[2][0] == "n2"
    d = schedule(snap([node("n1", gpus=4), node("n2", gpus=4)], [job(3, gpus=6)], teams=[team("a", 8)]))
    assert d.to_start == () and "infeasible: needs 6× " in d.pending[3] and "largest" in d.pending[3]


def test_multi_node_gang_when_enabled_fewest_nodes_one_flavor():
    nodes = [node("n1", gpus=4), node("n2", gpus=4), node("n3", gpus=2), node("l", gpus=8, model=L4)]
    d = schedule(snap(nodes, [job(1, gpus=6, model=H100)], teams=[team("a", 16)], multi_node=True))
    p = d.to_start[0].placement
    assert [n for n, _ in p.all_parts()] == ["n1", "n2"] or [n for n, _ in p.all_parts()] == ["n1", "n3"]
    assert sum(len(ix) for _, ix in p.all_parts()) == 6 and (p.node_id, p.gpu_indices) == p.all_parts()[0]
    assert "l" not in [n for n, _ in p.all_parts()]


def test_best_fit_by_free_memory_and_foreign_memory_respected():
    n = node("n1", gpus=3, foreign={0: 75000, 1: 40000})
    d = schedule(snap([n], [job(1, mem=30000)]))
    assert started(d)[1] == ("n1", (1,))  # GPU 1 has ~40 GB free: the tightest that fits
    d = schedule(snap([node("n1", gpus=1, foreign={0: 75000})], [job(1, mem=10000)]))
    assert d.to_start == () and "waiting for resources" in d.pending[1]


def test_shareable_jobs_share_exclusive_never():
    nodes = [node("n1", gpus=2)]
    d = schedule(snap(nodes, [job(1, share=True, mem=20000), job(2, share=True, mem=20000),
                              job(3, mem=20000)]))
    p = started(d)
    assert p[1] == p[2] and p[3] != p[1]
    # exclusive job never joins a shared GPU, even with memory left
    d = schedule(snap(nodes, [job(3, mem=1000)], [run(1, "n1", (0,), share=True), run(2, "n1", (1,))]))
    assert d.to_start == ()


def test_sharing_needs_low_live_utilization():
    r = [run(1, "n1", (0,), share=True)]
    # GPUs are scarce (2 wanted, 1 free): the shareable job packs where utilization allows
    d = schedule(snap([node("n1", gpus=2, util={0: 0.95})], [job(2, share=True), job(3)], r))
    assert started(d) == {2: ("n1", (1,))}
    d = schedule(snap([node("n1", gpus=2, util={0: 0.2})], [job(2, share=True), job(3)], r))
    assert started(d) == {2: ("n1", (0,)), 3: ("n1", (1,))}


def test_shareable_job_takes_its_own_gpu_while_gpus_are_spare():
    """Co-tenants slow each other down: with a free GPU for everyone waiting, no sharing; the
    shareable job shares only when no GPU of its own fits."""
    r = [run(1, "n1", (0,), share=True)]
    d = schedule(snap([node("n1", gpus=2, util={0: 0.2})], [job(2, share=True)], r))
    assert started(d)[2] == ("n1", (1,))
    full = [run(1, "n1", (0,), share=True), run(4, "n1", (1,))]
    d = schedule(snap([node("n1", gpus=2, util={0: 0.2})], [job(2, share=True)], full))
    assert started(d)[2] == ("n1", (0,))


def test_a_long_shareable_job_does_not_pack():
    """GPUs scarce (2 wanted, 1 free): a shareable job expected to run 10 h does not join the
    shared GPU (it would crawl beside its co-tenant for the whole run); a 1 h one does."""
    r = [run(1, "n1", (0,), share=True)]
    long_ = schedule(snap([node("n1", gpus=2, util={0: 0.2})], [job(2, share=True, dur=36000), job(3, dur=100)], r))
    assert 2 not in started(long_) or started(long_)[2] != ("n1", (0,))
    short = schedule(snap([node("n1", gpus=2, util={0: 0.2})], [job(2, share=True, dur=3600), job(3, dur=100)], r))
    assert started(short)[2] == ("n1", (0,))


def test_flavor_constraint_and_smallest_fitting_flavor_preferred():
    nodes = [node("h", gpus=4), node("l4", gpus=4, model=L4)]
    assert started(schedule(snap(nodes, [job(1, model=H100)])))[1][0] == "h"
    assert started(schedule(snap(nodes, [job(1, mem=10000)])))[1][0] == "l4"
    assert started(schedule(snap(nodes, [job(1, mem=30000)])))[1][0] == "h"


def test_unhealthy_gpus_and_unschedulable_nodes_get_nothing():
    d = schedule(snap([node("n1", gpus=4, unhealthy=(0,)), node("n2", schedulable=False)],
                      [job(i) for i in range(1, 6)]))
    assert sorted(ix[0] for n, ix in started(d).values()) == [1, 2, 3]
    assert {n for n, _ in started(d).values()} == {"n1"} and len(d.pending) == 2


def test_cpus_are_a_limit_too():
    n = NodeView("n1", "n1", node("n1").gpus, cpus=4)
    reqs = [job(i, cpg=2) for i in (1, 2, 3)]
    d = schedule(snap([n], reqs))
    assert list(started(d)) == [1, 2]
    assert "needs 2 CPUs on one node" in d.pending[3]
    big = JobRequest(9, "a", 0, 0.0, 2, 1000, None, cpus_per_gpu=3)
    assert "6 CPUs" in never_fits(big, (n,), (TeamQuota("a", 8),)) or "largest" in never_fits(big, (n,), (TeamQuota("a", 8),))


def test_deterministic():
    nodes = [node("n1"), node("n2")]
    pending = [job(i, team="ab"[i % 2], gpus=1 + i % 3, dur=100.0 * i) for i in range(1, 12)]
    assert schedule(snap(nodes, pending)) == schedule(snap(nodes, pending))


def test_never_fits_reasons():
    nodes = (node("n1", gpus=4),)
    quotas = (TeamQuota("a", 8),)
    assert never_fits(job(1, gpus=4), nodes, quotas) is None
    assert "largest H100 80GB node has 4 GPUs" in never_fits(job(1, gpus=8), nodes, quotas)
    assert "may hold at most 8" in never_fits(job(1, gpus=16), (node("n1", 16),), quotas)
    assert "no quota" in never_fits(job(1, team="zz"), nodes, quotas)
    assert "usable per GPU" in never_fits(job(1, mem=200_000), nodes, quotas)


# -- budgets -----------------------------------------------------------------------------------

def test_over_budget_team_starts_no_borrowed_work():
    teams = [team("a", 1, cohort="c", budget=100, spent=100), team("b", 7, cohort="c")]
    d = schedule(snap([node("n1")], [job(1), job(2)], teams=teams, cohorts=["c"]))
    assert list(started(d)) == [1]  # within nominal
    assert "over budget: team a spent $100.00 of its $100.00 budget" in d.pending[2]
    d = schedule(snap([node("n1")], [job(1)], teams=teams, cohorts=["c"], over_budget="none"))
    assert d.to_start == () and "no new work starts" in d.pending[1]


# -- preemption --------------------------------------------------------------------------------

def test_quota_reclaim_preempts_borrowers_with_least_lost_work():
    teams = [team("a", 4, cohort="c"), team("b", 4, cohort="c")]
    running = [run(10 + i, "n1", (i,), team="b", ckpt=NOW - 60 * (i + 1)) for i in range(8)]
    d = schedule(snap([node("n1")], [job(1, team="a", gpus=2)], running, teams=teams, cohorts=["c"]))
    assert {p.job_id for p in d.to_preempt} == {10, 11}  # checkpointed most recently
    assert "reclaims its own" in d.to_preempt[0].reason and "preempting jobs 10, 11" in d.pending[1]


def test_no_preemption_when_gpus_free_up_within_the_grace():
    """Borrowers expected to end in 10 min: team a waits for them (reserved, with an estimated
    start) instead of preempting; ending in 2 h (beyond the 1 h grace) they are preempted."""
    teams = [team("a", 4, cohort="c"), team("b", 4, cohort="c")]
    soon = [run(10 + i, "n1", (i,), team="b", end=NOW + 600) for i in range(8)]
    d = schedule(snap([node("n1")], [job(1, team="a", gpus=2)], soon, teams=teams, cohorts=["c"]))
    assert d.to_preempt == () and d.estimated_start[1] == NOW + 600 and d.pending[1].startswith("reserved")
    late = [run(10 + i, "n1", (i,), team="b", end=NOW + 7200) for i in range(8)]
    d = schedule(snap([node("n1")], [job(1, team="a", gpus=2)], late, teams=teams, cohorts=["c"]))
    assert len(d.to_preempt) == 2
    d = schedule(snap([node("n1")], [job(1, team="a", gpus=2)], soon, teams=teams, cohorts=["c"], preempt_grace_s=0))
    assert len(d.to_preempt) == 2  # grace off: reclaim at once
    waited = job(1, team="a", gpus=2, t=NOW - 3601)  # waited the grace already: no more waiting
    assert len(schedule(snap([node("n1")], [waited], soon, teams=teams, cohorts=["c"])).to_preempt) == 2


def test_the_job_that_sets_the_makespan_is_not_reclaimed():
    """Job 10 (100 h left, longer than all other work) would be the cheapest victim by lost work,
    but preempting it would push the end of everything back: reclaim takes others."""
    teams = [team("a", 4, cohort="c"), team("b", 4, cohort="c")]
    running = [run(10, "n1", (0,), team="b", ckpt=NOW - 1, end=NOW + 360000)]
    running += [run(11 + i, "n1", (1 + i,), team="b", ckpt=NOW - 60 * (i + 1), end=NOW + 7200) for i in range(7)]
    d = schedule(snap([node("n1")], [job(1, team="a", gpus=2)], running, teams=teams, cohorts=["c"]))
    assert {p.job_id for p in d.to_preempt} == {11, 12}
    d = schedule(snap([node("n1")], [job(1, team="a", gpus=2)], running, teams=teams, cohorts=["c"],
                      makespan_guard=False))
    assert {p.job_id for p in d.to_preempt} == {10, 11}


def test_reclaim_respects_min_runtime_and_nominal_of_victim():
    teams = [team("a", 4, cohort="c"), team("b", 4, cohort="c")]
    young = [run(10 + i, "n1", (i,), team="b", started=NOW - 10) for i in range(8)]
    d = schedule(snap([node("n1")], [job(1, team="a")], young, teams=teams, cohorts=["c"]))
    assert d.to_preempt == ()
    # b holds only its nominal: nothing to reclaim from b
    own = [run(10 + i, "n1", (i,), team="b") for i in range(4)] + [run(20 + i, "n1", (4 + i,), team="a")
                                                                   for i in range(4)]
    d = schedule(snap([node("n1")], [job(1, team="a")], own, teams=teams, cohorts=["c"]))
    assert d.to_preempt == ()


def test_only_work_the_free_gpus_could_take_claims_idle_nominal_quota():
    """Team a's waiting job claims a's idle nominal quota, so b (ranked first by priority) may not
    borrow it - but only when the free GPUs could take a's job. A 2-GPU gang facing one free GPU
    on each of two nodes claims nothing: lending the GPU is free, and the gang gets its GPUs by
    reservation or reclaim."""
    teams = [team("a", 2, cohort="c"), team("b", 2, cohort="c")]
    pending = [job(1, team="a", gpus=2), job(2, team="b", prio=5)]
    together = [run(10, "n1", (0,), team="b", prio=5), run(11, "n1", (1,), team="b", prio=5)]
    d = schedule(snap([node("n1", gpus=4)], pending, together, teams=teams, cohorts=["c"]))
    assert started(d) == {1: ("n1", (2, 3))} and d.pending[2].startswith("waiting for quota")
    scattered = [run(10, "n1", (0,), team="b", prio=5), run(11, "n2", (0,), team="b", prio=5)]
    d = schedule(snap([node("n1", gpus=2), node("n2", gpus=2)], pending, scattered, teams=teams, cohorts=["c"]))
    assert set(started(d)) == {2} and 1 in d.pending


def test_reclaim_backs_off_from_jobs_it_restarted_before():
    """A borrower restarted k times is not reclaimed again before it ran min_runtime_s x 2^k in
    this attempt (preemption backoff): bursty lenders cannot ping-pong one job for ever. Priority
    preemption inside a team is not held back."""
    teams = [team("a", 4, cohort="c"), team("b", 4, cohort="c")]

    def borrowers(ran: float, restarts: int) -> list:
        return [run(10 + i, "n1", (i,), team="b", started=NOW - ran, restarts=restarts,
                    ckpt=NOW - 60 * (i + 1)) for i in range(8)]

    def victims(running, **kw) -> set[int]:
        return {p.job_id for p in schedule(snap([node("n1")], [job(1, team="a", gpus=2, **kw)], running,
                                                teams=teams, cohorts=["c"])).to_preempt}

    assert victims(borrowers(ran=1000, restarts=0)) == {10, 11}  # past min_runtime_s (300 s)
    assert victims(borrowers(ran=1000, restarts=2)) == set()  # restarted twice: 1,200 s first
    assert victims(borrowers(ran=1300, restarts=2)) == {10, 11}
    assert victims(borrowers(ran=1300, restarts=3)) == set()  # 2,400 s
    d = schedule(snap([node("n1")], [job(1, team="a", gpus=2)], borrowers(ran=1000, restarts=2),
                      teams=teams, cohorts=["c"], preempt_backoff=1.0))
    assert len(d.to_preempt) == 2  # backoff off: min_runtime_s alone
    mine = [run(10 + i, "n1", (i,), team="a", started=NOW - 400, restarts=5) for i in range(8)]
    assert len(schedule(snap([node("n1")], [job(1, team="a", gpus=2, prio=5)], mine,
                             teams=[team("a", 8)])).to_preempt) == 2  # priority: min_runtime_s only


def test_priority_preemption_within_a_team_only():
    running = [run(10, "n1", (0, 1), team="a", prio=0), run(11, "n1", (2, 3), team="b", prio=0)]
    d = schedule(snap([node("n1", gpus=4)], [job(1, team="a", gpus=2, prio=5)], running))
    assert [p.job_id for p in d.to_preempt] == [10]
    d = schedule(snap([node("n1", gpus=4)], [job(1, team="b", gpus=4, prio=5)], running,
                      teams=[team("a"), team("b", 4)]))
    assert d.to_preempt == ()


def test_stopping_jobs_are_waited_for_not_preempted_again():
    teams = [team("a", 4, cohort="c"), team("b", 4, cohort="c")]
    running = [run(10, "n1", (0, 1), team="b", stopping=True)] + [run(11 + i, "n1", (2 + i,), team="b")
                                                                    for i in range(6)]
    d = schedule(snap([node("n1")], [job(1, team="a", gpus=2)], running, teams=teams, cohorts=["c"]))
    assert d.to_preempt == () and "waiting for preempted job 10" in d.pending[1]


def test_las_preemption_when_enabled():
    running = [run(10, "n1", (0,), team="a", attained=100_000)]
    pend = [job(1, team="a", attained=0)]
    assert schedule(snap([node("n1", gpus=1)], pend, running)).to_preempt == ()
    d = schedule(snap([node("n1", gpus=1)], pend, running, las_preempt_factor=4))
    assert [p.job_id for p in d.to_preempt] == [10]


# defragmentation: n1 has 3 free GPUs and job 10 (1 GPU); n2 has 1 free GPU and job 11 (3 GPUs); both
# run 10 h more. A 4-GPU gang would wait 10 h for a whole node although 4 GPUs are free. (Job 12 keeps
# n3 busy for 40 h: the backlog's drain time then exceeds 10 h, so the makespan guard exempts neither.)
FRAG_NODES = [node("n1", gpus=4), node("n2", gpus=4), node("n3", gpus=8)]
BUSY = run(12, "n3", tuple(range(8)), team="b", end=NOW + 40 * 3600)


def frag_running(end10: float = NOW + 36000, prio10: int = 0, restarts10: int = 0) -> list:
    return [run(10, "n1", (0,), team="b", ckpt=NOW - 60, end=end10, prio=prio10, restarts=restarts10),
            run(11, "n2", (0, 1, 2), team="b", end=NOW + 36000), BUSY]


def test_defragmentation_moves_a_small_job_to_free_gpus_for_a_gang():
    pend = [job(1, gpus=4, dur=3600)]
    d = schedule(snap(FRAG_NODES, pend, frag_running(), defrag_factor=0))
    assert d.to_preempt == () and d.pending[1].startswith("reserved")  # off: it drains n1
    d = schedule(snap(FRAG_NODES, pend, frag_running()))  # on by default (defrag_factor 2)
    assert [p.job_id for p in d.to_preempt] == [10] and d.to_start == ()
    assert "free GPUs on another node can take this job at once" in d.to_preempt[0].reason
    assert "defragmentation" in d.pending[1] and "preempting job 10 on n1" in d.pending[1]
    # once job 10 has moved to n2's free GPU, the gang starts on n1
    moved = [run(10, "n2", (3,), team="b", started=NOW), *frag_running()[1:]]
    d = schedule(snap(FRAG_NODES, pend, moved, defrag_factor=2))
    assert started(d) == {1: ("n1", (0, 1, 2, 3))} and d.to_preempt == ()


def test_defragmentation_only_when_it_pays_and_the_movers_fit_elsewhere():
    pend = [job(1, gpus=4, dur=3600)]
    # the gang's wait (4 GPUs x 10 h) is below the factor x the mover's cost (1 GPU x (60 s lost + 300 s))
    assert schedule(snap(FRAG_NODES, pend, frag_running(), defrag_factor=500)).to_preempt == ()
    # n1 frees up in a minute: waiting costs less than a restart
    assert schedule(snap(FRAG_NODES, pend, frag_running(end10=NOW + 60), defrag_factor=2)).to_preempt == ()
    # a job past its expected end is expected to overrun by as much again (2 h here), not to end now
    d = schedule(snap(FRAG_NODES, pend, frag_running(end10=NOW - 7200), defrag_factor=2))
    assert [p.job_id for p in d.to_preempt] == [10]
    # higher priority than the gang, or in its preemption backoff (4 restarts: 300 s x 2^4 > its
    # 1 h run): job 10 stays, and the gang clears n2 instead (job 11 moves to n1's 3 free GPUs:
    # 3 GPUs x (1 h lost + 300 s), still worth it)
    for running in (frag_running(prio10=1), frag_running(restarts10=4)):
        assert [p.job_id for p in schedule(snap(FRAG_NODES, pend, running, defrag_factor=2)).to_preempt] == [11]
    # a 2-GPU mover finds no 2 free GPUs on one other node: nobody moves (it would only wait instead)
    nodes = [*FRAG_NODES, node("n4", gpus=4)]
    running = [run(10, "n1", (0, 1), team="b", end=NOW + 36000), run(11, "n2", (0, 1, 2), team="b", end=NOW + 36000),
               BUSY, run(13, "n4", (0, 1, 2), team="b", end=NOW + 36000)]
    d = schedule(snap(nodes, pend, running, defrag_factor=2))
    assert d.to_preempt == () and d.pending[1].startswith("reserved")


def test_defragmentation_clears_the_cheapest_node_whose_movers_fit_elsewhere():
    """n1: job 10 (2 GPUs x 70 GB, checkpointed 10 s ago) and 2 free GPUs; n2: job 11 (1 GPU,
    checkpointed 10 min ago) and 3 free GPUs that foreign processes leave 50 GB on. Clearing n1
    loses the least work, but job 10 fits on no other free GPU (too little memory on n2's): n2 is
    cleared instead, job 11 moving to n1's free GPUs."""
    nodes = [node("n1", gpus=4), node("n2", gpus=4, foreign={1: 30000, 2: 30000, 3: 30000}), FRAG_NODES[2]]
    running = [run(10, "n1", (0, 1), team="b", mem=70000, ckpt=NOW - 10, end=NOW + 36000),
               run(11, "n2", (0,), team="b", ckpt=NOW - 600, end=NOW + 36000), BUSY]
    d = schedule(snap(nodes, [job(1, gpus=4, dur=3600)], running))
    assert [p.job_id for p in d.to_preempt] == [11] and "preempting job 11 on n2" in d.pending[1]


# -- backfill and explain ----------------------------------------------------------------------

def test_reservation_and_backfill():
    # 5 GPUs: 3 busy until NOW+600; a 4-GPU job reserves; a short 1-GPU job backfills, a long one waits.
    running = [run(10 + i, "n1", (i,), team="b", end=NOW + 600) for i in range(3)]
    pend = [job(1, gpus=4, t=NOW - 50, dur=100), job(2, dur=300, t=NOW - 40), job(3, dur=3000, t=NOW - 30)]
    # (job 3 would end after everything else: the makespan guard would start it first; off here)
    d = schedule(snap([node("n1", gpus=5)], pend, running, teams=[team("a", 8), team("b", 8)], makespan_guard=False))
    assert d.pending[1].startswith("reserved: starts at ~") and "on n1 GPUs 0,1,3,4" in d.pending[1]
    named = [NodeView("id-7f3a", "node-3", n.gpus) for n in [node("n1", gpus=5)]]
    r2 = [run(10 + i, "id-7f3a", (i,), team="b", end=NOW + 600) for i in range(3)]
    assert "on node-3 GPUs" in schedule(snap(named, pend[:1], r2)).pending[1]  # the name, not the Ray id
    assert d.estimated_start[1] == NOW + 600
    assert list(started(d)) == [2]
    assert "would delay job 1's reservation" in d.pending[3]


def test_forecast_estimates_starts_beyond_the_reservation_in_rank_order():
    """squeue --start: 4 GPUs busy until +600/+1200/+1800/+2400; three 2-GPU jobs of 1000 s wait.
    The first reserves the GPUs freeing at +600 and +1200 (starts +1200, ends +2200); the second
    takes the earliest pair left, GPU 2 (+1800) and one of job 1's (+2200), so starts +2200; the
    third gets job 1's other GPU (+2200) and GPU 3 (+2400): +2400. No estimate where the GPUs it
    needs belong to running jobs with no expected end."""
    from scheduler.policy import forecast

    running = [run(10 + i, "n1", (i,), team="b", end=NOW + 600 * (i + 1)) for i in range(4)]
    pend = [job(1, gpus=2, dur=1000, t=NOW - 50), job(2, gpus=2, dur=1000, t=NOW - 40),
            job(3, gpus=2, dur=1000, t=NOW - 30)]
    sn = snap([node("n1", gpus=4)], pend, running, teams=[team("a", 8), team("b", 8)], makespan_guard=False)
    d = schedule(sn)
    assert d.estimated_start == {1: NOW + 1200}  # the cycle itself: one reservation
    est = forecast(sn)
    assert est == {1: NOW + 1200, 2: NOW + 2200, 3: NOW + 2400}
    assert forecast(sn, depth=2) == {1: NOW + 1200, 2: NOW + 2200}
    unknown = [run(10 + i, "n1", (i,), team="b", end=None if i >= 2 else NOW + 600 * (i + 1)) for i in range(4)]
    est = forecast(snap([node("n1", gpus=4)], pend, unknown, teams=[team("a", 8), team("b", 8)], makespan_guard=False))
    assert est == {1: NOW + 1200, 2: NOW + 2200, 3: NOW + 3200}  # after job 2, on GPUs 0-1 again
    pend[1] = job(2, gpus=2, dur=None, t=NOW - 40)  # no duration: ranks first, holds GPUs 0-1 for good
    est = forecast(snap([node("n1", gpus=4)], pend, unknown, teams=[team("a", 8), team("b", 8)], makespan_guard=False))
    assert est == {2: NOW + 1200}


def test_no_reservation_without_end_times_unless_aged():
    running = [run(10 + i, "n1", (i,), team="b") for i in range(3)]
    d = schedule(snap([node("n1", gpus=4)], [job(1, gpus=4), job(2)], running))
    assert list(started(d)) == [2] and "waiting for resources" in d.pending[1]
    d = schedule(snap([node("n1", gpus=4)], [job(1, gpus=4, t=NOW - 7200), job(2)], running))
    assert d.to_start == () and "aging horizon" in d.pending[1]


def test_every_pending_job_has_a_reason():
    pend = [job(i, gpus=1 + i % 4, team="ab"[i % 2]) for i in range(1, 40)]
    d = schedule(snap([node("n1", gpus=4), node("n2", gpus=2, model=A100)], pend))
    assert set(d.pending) | set(started(d)) == {j.job_id for j in pend}
    assert all(d.pending.values())


def test_priority_preemption_frees_the_teams_own_quota():
    teams = [team("a", 2)]
    low = [run(10, "n1", (0, 1), team="a", prio=0, ckpt=NOW - 5), run(11, "n1", (2,), team="a", prio=3)]
    d = schedule(snap([node("n1", gpus=4)], [job(1, gpus=2, prio=5)], low, teams=[team("a", 3)]))
    assert [p.job_id for p in d.to_preempt] == [10] and "needs the quota" in d.to_preempt[0].reason
    assert "preempting job 10 of lower priority" in d.pending[1]
    stopping = [run(10, "n1", (0, 1), team="a", stopping=True), run(11, "n1", (2,), team="a", prio=3)]
    d = schedule(snap([node("n1", gpus=4)], [job(1, gpus=2, prio=5)], stopping, teams=[team("a", 3)]))
    assert d.to_preempt == () and "waiting for lower-priority jobs" in d.pending[1]
    # equal priority: no preemption, the quota reason stays
    d = schedule(snap([node("n1", gpus=4)], [job(1, gpus=2, prio=0)], low[:1], teams=teams))
    assert d.to_preempt == () and d.pending[1].startswith("waiting for quota")


def test_a_shared_gpu_takes_at_most_share_max_jobs():
    """Co-tenants slow each other: a shared GPU takes at most `share_max_jobs` shareable jobs
    (default 2), across cycles and within one; memory and utilization alone would let a dozen
    small jobs crawl on one GPU."""
    nodes = [node("n1", gpus=2, util={0: 0.2})]
    two = [run(1, "n1", (0,), share=True), run(2, "n1", (0,), share=True), run(4, "n1", (1,))]
    d = schedule(snap(nodes, [job(3, share=True)], two))
    assert d.to_start == ()
    d = schedule(snap(nodes, [job(3, share=True)], two, share_max_jobs=3))
    assert started(d)[3] == ("n1", (0,))
    d = schedule(snap([node("n1", gpus=1)], [job(5, share=True), job(6, share=True), job(7, share=True)]))
    assert set(started(d)) == {5, 6}
    d = schedule(snap([node("n1", gpus=1)], [job(5, share=True), job(6, share=True), job(7, share=True)],
                      share_max_jobs=0))
    assert set(started(d)) == {5, 6, 7}


def test_jobs_of_one_shape_see_the_state_the_previous_ones_left():
    """The cycle memoizes answers per job shape (quota checks, victim candidates, fits) until
    the next start or preemption; a job of the same shape right after one that started or
    preempted must get a fresh answer, not the one before."""
    # quota: nominal 1 and no cohort, two free GPUs: the second 1-GPU job waits for quota
    d = schedule(snap([node("n1", gpus=2)], [job(1), job(2)], teams=[team("a", 1)]))
    assert set(started(d)) == {1} and d.pending[2].startswith("waiting for quota")
    # reclaim: three 1-GPU jobs of team a each take their own borrower, never one twice
    teams = [team("a", 4, cohort="c"), team("b", 4, cohort="c")]
    running = [run(10 + i, "n1", (i,), team="b", ckpt=NOW - 60 * (i + 1)) for i in range(8)]
    d = schedule(snap([node("n1")], [job(1), job(2), job(3)], running, teams=teams, cohorts=["c"]))
    assert [p.job_id for p in d.to_preempt] == [10, 11, 12]
    assert [d.pending[j].split(" on ")[0] for j in (1, 2, 3)] == ["preempting job 10", "preempting job 11",
                                                                  "preempting job 12"]
