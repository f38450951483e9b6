"""The simulator end to end: determinism, the Shoal policy in the harness, metrics, the cluster
file, the workload model, GPU sharing, and `shoal simulate` through the CLI."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scheduler.policy import schedule
from scheduler.sim.baselines import fifo, srtf
from scheduler.sim.config import parse_sim_cluster
from scheduler.sim.executor import SimExecutor
from scheduler.sim.metrics import jain, makespan_bound, percentile, summarize
from scheduler.sim.runner import prepare
from scheduler.sim.traces import Trace, TraceJob
from scheduler.sim.workload import WorkloadConfig, make_jobs, memory_per_gpu_mib
from scheduler.spec import SpecError
from tests.sim.conftest import cluster, jct_by_index, run, trace

REPO = Path(__file__).resolve().parents[2]


def random_trace(n=120, seed=3):
    import random
    rng = random.Random(seed)
    rows, t = [], 0.0
    for _ in range(n):
        t += rng.expovariate(1 / 40)
        rows.append((round(t), round(rng.lognormvariate(5, 1.2)) + 1, rng.choice([1, 1, 1, 2, 4, 8]),
                     rng.choice(["x", "y"])))
    return trace(*rows)


def _replay(policy, *, nodes: int, teams: dict[str, int], jobs: int, seed: int, scheduler: dict | None = None,
            before=None, **simulation):
    """Replay `jobs` jobs of random_trace(seed) (submits x 10, durations x 40) through `policy` on
    `nodes` 8-GPU H100 nodes shared by `teams` (name -> nominal GPUs, one cohort); `before(sim)`, if
    given, runs on the Simulation before it does."""
    from scheduler.sim.engine import Simulation

    doc = {"gpu_models": {"H100 80GB": {"memory_gib": 80}},
           "nodes": [{"count": nodes, "gpus_per_node": 8, "gpu_model": "H100 80GB"}],
           "teams": {t: {"gpus": g, "cohort": "all"} for t, g in teams.items()}, "cohorts": {"all": {}},
           "simulation": {"tick_s": 60, "restart_overhead_s": 30, "workload": {"estimate_sigma": 0.5}, **simulation}}
    if scheduler:
        doc["scheduler"] = scheduler
    sc = parse_sim_cluster(yaml.safe_dump(doc), "<test>")
    rows = trace(*[(t.submit_s * 10, t.duration_s * 40, t.gpus, t.group) for t in random_trace(jobs, seed=seed)])
    sim = Simulation(sc, make_jobs(rows, sc.sim.workload, sc.team_of, sc.sim.seed), policy, "shoal")
    if before is not None:
        before(sim)
    return sim.run()


def test_same_seed_same_output_different_seed_different_workload():
    sc = cluster(nodes=2, gpus=8, teams={"x": 16, "y": 16}, tick_s=60, restart_overhead_s=30,
                 workload={"estimate_sigma": 0.5})
    rows = random_trace()
    a = run(sc, rows, srtf, oracle=True)
    b = run(sc, rows, srtf, oracle=True)
    strip = lambda r: [{k: v for k, v in j.items()} for j in r.jobs]  # noqa: E731
    assert strip(a) == strip(b) and a.timeline == b.timeline
    assert summarize(a) | {"sim_wall_s": 0, "sim_events_per_s": 0} == summarize(b) | {"sim_wall_s": 0, "sim_events_per_s": 0}
    other = make_jobs(rows, sc.sim.workload, lambda tj: tj.group, seed=1)
    same = make_jobs(rows, sc.sim.workload, lambda tj: tj.group, seed=0)
    assert [j.estimate_s for j in same] == [j.estimate_s for j in make_jobs(rows, sc.sim.workload, lambda tj: tj.group, 0)]
    assert [j.estimate_s for j in other] != [j.estimate_s for j in same]


def test_shoal_policy_runs_in_the_harness_and_every_job_finishes():
    """Whatever scheduler.policy.schedule is, the same service loop runs it: every admitted job
    ends SUCCEEDED, no GPU holds two exclusive jobs, and JCT >= run time."""
    sc = cluster(nodes=2, gpus=8, teams={"x": 16, "y": 16}, tick_s=60)
    r = run(sc, random_trace(80), schedule, "shoal")
    assert {j["state"] for j in r.jobs} == {"SUCCEEDED"}
    assert all(j["jct_s"] >= j["duration_s"] - 1e-6 for j in r.jobs)
    s = summarize(r)
    assert s["jobs_completed"] == 80 and s["makespan_s"] >= s["makespan_lower_bound_s"] - 1e-6


def test_defragmentation_moves_a_job_so_a_gang_starts_now():
    """Two nodes of 4 GPUs, no overheads, exact estimates, one class of job (not shareable).
    t=0: P (2 GPUs, 3000 s), Q and S (2 GPUs, 200 s), R (2 GPUs, 30000 s). R sets the makespan and
    goes first (node A), Q joins it (best fit), S and P take node B. At 200 Q and S end: each node
    has 2 GPUs free. At 400 G (4 GPUs, 100 s) arrives. Without defragmentation G waits for P's end
    (3000) and runs 3000-3100 (JCT 2700). With it (the default), P (the cheapest to move; R is
    exempt: it sets the makespan) checkpoints and restarts at once on A's 2 free GPUs, and G runs
    400-500 (JCT 100) on B. P loses no work (a stop checkpoints), so it still ends at 3000."""
    import dataclasses

    sc = cluster(nodes=2, gpus=4, workload={"estimate_sigma": 0, "classes": [
        {"name": "w", "weight": 1, "model": "qwen2.5-0.5b", "method": "lora", "shareable": False}]})
    rows = trace((0, 3000, 2, "x"), (0, 200, 2, "x"), (0, 30000, 2, "x"), (0, 200, 2, "x"), (400, 100, 4, "x"))
    on = run(sc, rows, schedule, "shoal")
    assert jct_by_index(on) == {0: 3000, 1: 200, 2: 30000, 3: 200, 4: 100}
    assert {j["index"]: j["preemptions"] for j in on.jobs} == {0: 1, 1: 0, 2: 0, 3: 0, 4: 0}
    off_settings = sc.cluster.scheduler.model_copy(update={"defrag_factor": 0.0})
    off = run(dataclasses.replace(sc, cluster=sc.cluster.model_copy(update={"scheduler": off_settings})),
              rows, schedule, "shoal")
    assert jct_by_index(off) == {0: 3000, 1: 200, 2: 30000, 3: 200, 4: 2700}
    assert sum(j["preemptions"] for j in off.jobs) == 0


@pytest.mark.parametrize("policy", ["shoal", "tiresias", "srtf"])
def test_cached_views_give_the_decisions_of_fresh_ones(policy):
    """The speed path (CachingInventory reuses an unchanged node's view; the policy and the
    baselines memoize per-node indexes on it) decides exactly what the plain path decides: the
    same trace run with a production `Inventory` (every node read and every view built anew each
    cycle, so no memo is ever hit) gives identical per-job starts, ends and preemptions."""
    from scheduler.inventory import Inventory
    from scheduler.sim.engine import Simulation
    from scheduler.sim.runner import resolve_policy

    doc = {"gpu_models": {"H100 80GB": {"memory_gib": 80}},
           "nodes": [{"count": 2, "gpus_per_node": 8, "gpu_model": "H100 80GB"}],
           "teams": {"x": {"gpus": 8, "cohort": "all"}, "y": {"gpus": 8, "cohort": "all"}}, "cohorts": {"all": {}},
           "simulation": {"tick_s": 60, "restart_overhead_s": 30, "workload": {"estimate_sigma": 0.5}}}
    sc = parse_sim_cluster(yaml.safe_dump(doc), "<test>")  # teams lend each other idle quota: reclaim
    rows = trace(*[(t.submit_s * 10, t.duration_s * 40, t.gpus, t.group) for t in random_trace(150, seed=5)])
    jobs = make_jobs(rows, sc.sim.workload, sc.team_of, sc.sim.seed)
    fn, oracle = resolve_policy(policy)
    runs = []
    for cached in (True, False):
        sim = Simulation(sc, jobs, fn, policy, oracle=oracle)
        if not cached:
            plain = sim.inventory
            sim.service.inventory = Inventory(lambda: plain._node_list, plain.readers)
        r = sim.run()
        runs.append([(j["job_id"], j["start_s"], j["end_s"], j["attempts"], j["preemptions"]) for j in r.jobs])
    assert runs[0] == runs[1]
    assert sum(j[4] for j in runs[0]) > 0  # the trace exercises preemption (and shareable jobs, sharing)


def test_jobs_that_can_never_fit_are_refused_like_the_api_does():
    sc = cluster(nodes=1, gpus=2, teams={"x": 2})
    r = run(sc, trace((0, 10, 1, "x"), (1, 10, 4, "x")), fifo)
    assert [j["index"] for j in r.jobs] == [0]
    assert r.rejected[0]["index"] == 1 and "needs 4×" in r.rejected[0]["reason"]
    assert summarize(r)["jobs_rejected"] == 1


def test_metrics_by_hand():
    assert percentile([5, 1, 3, 2, 4], 50) == 3 and percentile([1, 2, 3, 4], 99) == 4 and percentile([], 50) is None
    assert jain([1, 1, 1]) == 1.0 and jain([1, 0]) == 0.5
    jobs = [{"gpus": 2, "duration_s": 100, "submit_s": 0}, {"gpus": 1, "duration_s": 10, "submit_s": 50}]
    assert makespan_bound(jobs, total_gpus=1) == 210  # work bound (2*100 + 10) / 1 GPU
    assert makespan_bound(jobs, total_gpus=8) == 100  # arrival + duration bound
    r = run(cluster(), trace((0, 100, 1, "x"), (10, 30, 1, "x")), fifo)
    s = summarize(r)
    # FIFO on one GPU: 0-100, 100-130. Cost: 130 GPU-s at $3.6/h = $0.13.
    assert (s["jct_avg_s"], s["queue_delay_avg_s"], s["makespan_s"], s["makespan_lower_bound_s"]) == (110, 45, 130, 130)
    assert s["cost_usd"] == pytest.approx(0.13) and s["cost_per_completed_job_usd"] == pytest.approx(0.065)
    assert s["allocation_avg"] == pytest.approx(1.0) and s["allocation_while_queue_nonempty"] == pytest.approx(1.0)
    assert s["utilization_avg"] == pytest.approx(1.0)
    # Team x (nominal 8, on a 1-GPU cluster) holds 1 GPU throughout; it wants 1 during 0-10 and
    # 100-130 (satisfied) and 2 during 10-100 (1 of min(8, 2): 0.5): (10 + 45 + 30) / 130.
    assert s["quota_satisfaction"]["x"] == pytest.approx(85 / 130) and s["quota_satisfaction"]["y"] is None
    assert s["jain_fairness_teams"] == 1.0  # one team with demand


def test_shared_gpu_slowdown_model():
    """Two tenants on one GPU with share_throughput [1, 1.5]: each runs at 0.75."""
    from scheduler.clock import FakeClock
    from scheduler.executor import LaunchRequest

    clock = FakeClock(0.0)
    ex = SimExecutor(clock, share_throughput=[1.0, 1.5])
    spec = lambda d: {"sim": {"duration_s": d}}  # noqa: E731
    ex.launch(LaunchRequest(1, 1, spec(30), "n", (0,), 1, "", ""))
    clock.advance(10)  # job 1 alone: 10 s of work
    ex.launch(LaunchRequest(2, 1, spec(15), "n", (0,), 1, "", ""))
    # now both at 0.75: job 2 needs 15/0.75 = 20 s -> ends at 30; job 1 did 10 + 15 = 25 by then
    assert ex.next_event_time() == pytest.approx(30.0)
    clock.advance(20)
    assert [o.job_id for o in ex.poll()] == [2]
    assert ex.next_event_time() == pytest.approx(35.0)  # job 1 alone again: 5 s left at full speed


def test_a_stop_is_not_lost_when_a_co_tenant_changes_the_rate():
    """A preempted job sharing a GPU stops at its stop time even if its co-tenants change while
    it stops (a re-rate used to invalidate the pending stop: the run then held its GPU forever -
    139 jobs stuck that way in the 10k Shoal replay)."""
    from scheduler.clock import FakeClock
    from scheduler.executor import LaunchRequest

    clock = FakeClock(0.0)
    ex = SimExecutor(clock, share_throughput=[1.0, 1.5], stop_s=5.0)
    spec = lambda d: {"sim": {"duration_s": d}}  # noqa: E731
    ex.launch(LaunchRequest(1, 1, spec(100), "n", (0,), 1, "", ""))
    ex.launch(LaunchRequest(2, 1, spec(100), "n", (0,), 1, "", ""))
    clock.advance(10)
    ex.request_stop(1, 1)  # stops at 15
    ex.launch(LaunchRequest(3, 1, spec(100), "n", (0,), 1, "", ""))  # a third tenant: everyone re-rated
    assert ex.next_event_time() == pytest.approx(15.0)
    clock.advance(5)
    assert [(o.job_id, o.status) for o in ex.poll()] == [(1, "preempted")]
    assert set(ex.runs) == {(2, 1), (3, 1)}


def test_workload_memory_and_classes():
    # 8B LoRA, batch 2, 1024 tokens: (8.03e9 x 2 B x 1.05 + 34*1024*2*4096*32 B + 2^30 B) / 2^20 = 25,810 MiB
    assert memory_per_gpu_mib("llama-3-8b", "lora", 1, 2, 1024) == 25_810
    assert memory_per_gpu_mib("llama-3-8b", "full", 8, 1, 1024) < memory_per_gpu_mib("llama-3-8b", "full", 4, 1, 1024)
    cfg = WorkloadConfig(classes=[{"name": "only-1", "weight": 1, "gpus": [1], "model": "qwen2.5-0.5b"}])
    with pytest.raises(ValueError, match="no job class covers 2-GPU jobs"):
        make_jobs([TraceJob(0, 1, 2, "x", "x", 7)], cfg, lambda tj: "x", 0)


def test_cluster_file_errors_name_the_line(tmp_path):
    text = """gpu_models: {"H100 80GB": {memory_gib: 80}}
nodes:
  - {count: 0, gpus_per_node: 8, gpu_model: "H100 80GB"}
teams: {a: {gpus: 8}}
simulation:
  tick_s: -1
"""
    with pytest.raises(SpecError) as e:
        parse_sim_cluster(text, "c.yaml")
    assert any(p.startswith("c.yaml:3: nodes.0.count:") for p in e.value.problems), e.value.problems
    assert any(p.startswith("c.yaml:6: simulation.tick_s:") for p in e.value.problems), e.value.problems
    with pytest.raises(SpecError, match="nodes.0.gpu_model 'A100' is not in gpu_models"):
        parse_sim_cluster('nodes: [{count: 1, gpus_per_node: 8, gpu_model: A100}]', "c.yaml")
    with pytest.raises(SpecError, match="needs at least one node group"):
        parse_sim_cluster("teams: {a: {gpus: 1}}", "c.yaml")
    with pytest.raises(SpecError, match="team\\(s\\) zz not in teams"):
        parse_sim_cluster('nodes: [{count: 1, gpus_per_node: 8, gpu_model: "H100 80GB"}]\n'
                          'simulation: {team_map: {"*": zz}}', "c.yaml")


def test_unmapped_trace_groups_are_an_error_and_oversize_fold_keeps_gpu_time():
    sc = cluster(nodes=1, gpus=8, teams={"x": 8})
    tr = Trace("t", trace((0, 10, 1, "x"), (1, 10, 1, "q")))
    with pytest.raises(ValueError, match="trace group\\(s\\) q map to no team"):
        prepare(tr, sc, None)
    sc = cluster(nodes=1, gpus=8, teams={"x": 8}, oversize="fold", team_map={"*": "x"})
    prep = prepare(Trace("t", trace((0, 100, 16, "a"))), sc, None)
    assert prep.folded == 1 and (prep.jobs[0].gpus, prep.jobs[0].duration_s) == (8, 200)
    sc = cluster(nodes=1, gpus=8, teams={"x": 8, "y": 8}, team_map={"ann": "x", "*": "y"}, map_by="user")
    rows = [TraceJob(0, 10, 1, "vc1", "ann", 2), TraceJob(1, 10, 1, "vc1", "bob", 3)]
    assert [j.team for j in prepare(Trace("t", rows), sc, None).jobs] == ["x", "y"]


def test_requeued_job_reports_remaining_time(tmp_path):
    """StoreViews.pending_views: after an attempt ran, expected_duration_s is what is left
    (expected - attained GPU-s / GPUs), not the spec's total; running_views' expected end too."""
    from scheduler.clock import FakeClock
    from scheduler.executor import InMemoryExecutor
    from scheduler.inventory import Inventory, NodeInfo
    from monitoring.gpu import FakeGpuReader
    from scheduler.lifecycle import JobState as S
    from scheduler.service import Service
    from scheduler.spec import ClusterConfig, TeamConfig
    from scheduler.store import MemoryStore

    clock, store, reader = FakeClock(0.0), MemoryStore(), FakeGpuReader(2)
    svc = Service(store, InMemoryExecutor(clock, lambda s: 1000), Inventory(lambda: [NodeInfo("n", "n")], {"n": reader}),
                  ClusterConfig(teams={"a": TeamConfig(gpus=2)}), clock, tmp_path)
    job = store.submit(spec={"resources": {"expected_duration_s": 100}}, name="j", team="a", user="u", priority=0,
                       gpus=2, memory_per_gpu_mib=1, now=0.0)
    assert svc.views.pending_views([store.get(job.id)])[0].expected_duration_s == 100
    svc.tick()
    clock.advance(30)
    snap = svc.views.snapshot()[0]
    (running,) = snap.running
    assert running.expected_end_at == 100 and running.attained(snap.now) == 60
    svc._preempt(job.id, "test")
    svc.tick()  # ingest: requeued, attained 2 GPUs x 30 s, and started again at once
    rec = store.get(job.id)
    assert rec.attained_gpu_s == 60 and rec.attempt == 2
    assert svc.views.running_views([rec])[0].expected_end_at == 30 + 70
    queued = store.transition(job.id, rec.state, S.QUEUED, reason="x", now=30, placement=None)
    assert svc.views.pending_views([queued])[0].expected_duration_s == 70  # 100 - 60 GPU-s / 2 GPUs


def test_shoal_simulate_cli(tmp_path):
    tr = tmp_path / "t.csv"
    tr.write_text("timestamp,duration,num_gpus,gpu_time,cluster\n" + "".join(
        f"2017-10-09 07:{m:02d}:00,{60 * (m % 5 + 1)}.0,{1 + m % 2},{60 * (m % 5 + 1) * (1 + m % 2)}.0,vc{m % 3}\n"
        for m in range(30)) + "bad,1,1,1,vc0\n")
    cl = tmp_path / "c.yaml"
    cl.write_text('gpu_models: {"H100 80GB": {memory_gib: 80, price_per_hour: 2.0}}\n'
                  'nodes: [{count: 1, gpus_per_node: 4, gpu_model: "H100 80GB"}]\n'
                  'teams: {a: {gpus: 2, cohort: c}, b: {gpus: 2, cohort: c}}\ncohorts: {c: {}}\n'
                  'simulation: {team_map: {vc0: a, "*": b}}\n')
    env = {**os.environ, "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "scheduler.cli", "simulate", "--trace", str(tr), "--cluster", str(cl),
           "--policy", "shoal,fifo,tiresias", "--jobs", "20", "--out", str(tmp_path / "out")]
    bad = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert bad.returncode == 2 and f"{tr}:32: timestamp:" in bad.stderr and "--skip-bad-rows" in bad.stderr
    p = subprocess.run(cmd + ["--skip-bad-rows"], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "1 bad trace row(s) left out" in p.stderr
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert [s["policy"] for s in summary["policies"]] == ["shoal", "fifo", "tiresias"]
    assert all(s["jobs_completed"] == 20 for s in summary["policies"])
    for f in ["summary.csv", "jobs-shoal.csv", "timeline-fifo.csv", "jct_cdf.png", "utilization.png", "queue.png",
              "report.html", "skipped-rows.txt"]:
        assert (out / f).stat().st_size > 0, f
    assert (out / "jct_cdf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "tiresias" in (out / "report.html").read_text()
    unknown = subprocess.run(cmd[:-6] + ["--policy", "lottery"], capture_output=True, text=True, env=env, cwd=REPO)
    assert unknown.returncode == 2 and "unknown policy 'lottery'" in unknown.stderr


def test_policy_without_wakeup_hint_gets_backed_off_periodic_ticks():
    """A policy with no `next_wakeup` (like Shoal's today) is ticked while jobs wait: 60 s after
    the last tick, doubling while ticks change nothing, capped at tick_max_s (600 s). One GPU,
    A runs 0-10,000 s, B waits: ticks at 0 (A), 1 (B), then 61, 181, 421, 901, 1501, ... every
    600 s, 10,000 (A ends, B starts), 10,010 (B ends): 3 + 4 + 15 + ... far fewer than the
    166 a fixed 60 s period would need; the schedule is the same as with the hinting FIFO."""
    sc = cluster(tick_s=60, tick_max_s=600)
    rows = trace((0, 10_000, 1, "x"), (1, 10, 1, "x"))
    plain = run(sc, rows, lambda snap: fifo(snap))
    assert jct_by_index(plain) == jct_by_index(run(sc, rows, fifo)) == {0: 10_000, 1: 10_009}
    assert plain.ticks == 2 + 4 + len(range(1501, 10_000, 600)) + 2
    # ticks by cause: the two arrivals, A's and B's ends, and every periodic one in between
    assert plain.ticks_by_cause == {"arrival": 2, "executor": 2, "periodic": 4 + len(range(1501, 10_000, 600)),
                                    "same_instant": 0}


def test_memoized_cycles_decide_what_cold_ones_decide(monkeypatch):
    """Every memo of the Shoal policy - within a cycle (reasons of waiting shapes, victim sets,
    choose(), quota checks, reservations) and across cycles (running jobs' facts on their views,
    the layout, feasibility, node indexes) - is a pure speed-up: each cycle of a replay with
    borrowing, reclaim, sharing and reservations is decided a second time with every module memo
    cleared and the cycle's memo forgetting what it is told, and the two decisions are equal."""
    import scheduler.policy.cluster as cluster_mod
    import scheduler.policy.running as running_mod
    import scheduler.policy.shoal as shoal

    class Forgetful(dict):
        def __setitem__(self, key, value):  # every lookup misses: each memoized value is recomputed
            pass

    index = shoal._index

    def cold_index(snap):
        cy = index(snap)
        cy.memo = Forgetful()
        return cy

    def decide(snap, cold: bool):
        if cold:
            for memo in (shoal._FEASIBLE, cluster_mod._NODE_INDEX, cluster_mod._LAYOUTS, cluster_mod._NODE_UNITS,
                         cluster_mod._BASE):
                memo.clear()
            running_mod.reset()
            monkeypatch.setattr(shoal, "_index", cold_index)
        try:
            d, held = shoal.plan(snap)
        finally:
            monkeypatch.setattr(shoal, "_index", index)
        return d.to_start, d.to_preempt, d.pending, d.estimated_start, held

    cycles = []

    def both(snap):
        warm, cold = decide(snap, False), decide(snap, True)
        assert warm == cold
        cycles.append(len(warm[0]) + len(warm[1]))
        return shoal.schedule(snap)

    # (a trace where a memo of waiting reasons that ignored the reservation - jobs that end before
    # it may use its GPUs, the others may not - decides differently in 9 cycles)
    r = _replay(both, nodes=2, teams={"x": 8, "y": 8}, jobs=300, seed=3)
    assert len(cycles) > 100 and sum(1 for c in cycles if c) > 20  # many cycles decided something
    assert sum(j["preemptions"] for j in r.jobs) > 0


def test_kept_index_equals_a_fresh_one(monkeypatch):
    """Two parts of the cycle's index are kept across cycles and patched with what changed: the
    running jobs' part (policy/running.py: by the views that changed; a view that changed only by
    a checkpoint is swapped in place) and the cluster's free GPUs
    (policy/cluster.py's _Base: by the nodes whose view changed). On every cycle of a replay with
    preemptions (stopping jobs, jobs crossing min_runtime_s, requeued jobs restarting under their
    old ids), sharing and borrowing, what they put into the cycle equals what a scan of every
    running job and a cluster built from scratch give: the same float sums and the same iteration
    orders a decision could read (victims by unit, stopping GPUs, units per free-GPU count)."""
    import scheduler.policy.cluster as cluster_mod
    import scheduler.policy.shoal as shoal
    from scheduler.policy.cluster import Cluster
    from scheduler.policy.quota import QuotaBook
    from scheduler.policy.rules import _exempt
    from scheduler.policy.running import scan
    from scheduler.policy.state import Cycle

    def fields(cy, guard):
        return (dict(cy.book.used), {t: dict(v) for t, v in cy.use.items()}, dict(cy.ends),
                {n: sorted(v) for n, v in cy.cpu_ends.items()}, list(cy.stopping.items()), dict(cy.stopping_amt),
                [(f, [(o, list(js.items())) for o, js in units.items()]) for f, units in cy.victims_ok.items()],
                dict(cy.min_prio), {f: sorted(t) for f, t in cy.victim_teams.items()}, dict(cy.flavor_of), guard)

    index = shoal._index
    seen = {"cycles": 0, "stopping": 0, "victims": 0, "shared": 0, "checkpointed": 0, "exempt": 0}

    def layout(c):
        return ([vars(u) for u in c.units], {f: vars(fl) for f, fl in c.flavors.items()}, c.cpus_free, c.node_cpus,
                {f: [list(d) for d in b] for f, b in c.buckets.items()}, c.shared, c.shared_slot, c.free_total,
                c.by_gpu)

    def checked(snap):
        cy = index(snap)
        running = {r.job_id: r for r in snap.running}
        cluster_mod._BASE.clear()  # a cluster built from scratch (it becomes the next cycle's base)
        ref = Cycle(snap, Cluster(snap, running), QuotaBook(snap.quotas, snap.cohorts), running)
        assert layout(cy.cluster) == layout(ref.cluster)
        ref.critical, ref.drain = shoal._critical_length(snap, ref.cluster, *scan(ref))
        assert fields(cy, (cy.critical, cy.drain)) == fields(ref, (ref.critical, ref.drain))
        # the jobs kept from reclaim: from the kept index's order by expected end, as a pass finds them
        assert _exempt(cy) == _exempt(ref)
        seen["exempt"] += bool(_exempt(ref))
        seen["cycles"] += 1
        seen["stopping"] += bool(ref.stopping)
        seen["victims"] += bool(ref.victims_ok)
        seen["shared"] += any(r.shareable for r in snap.running)
        # victims whose view changed only by a checkpoint (RunningIndex._swap)
        seen["checkpointed"] += any(r.last_checkpoint_at is not None for units in ref.victims_ok.values()
                                    for rs in units.values() for r in rs.values())
        return cy

    monkeypatch.setattr(shoal, "_index", checked)
    r = _replay(schedule, nodes=3, teams={"x": 8, "y": 8, "z": 8}, jobs=300, seed=5, stop_s=600)
    assert seen["cycles"] > 100 and seen["stopping"] > 5 and seen["victims"] > 50 and seen["shared"] > 20, seen
    assert seen["checkpointed"] > 20 and seen["exempt"] > 20, seen
    assert sum(j["preemptions"] for j in r.jobs) > 0 and all(j["state"] == "SUCCEEDED" for j in r.jobs)


def test_a_replay_through_the_change_log_decides_as_one_reading_every_job():
    """The simulator's store keeps a change log, so the loop's views are kept by the records that
    changed (StoreViews._advance); a store without one is read in full every cycle, as the SQL
    store is. The same replay both ways (preemptions, checkpoints, restarts) starts, ends and
    restarts every job at the same times."""
    def no_log(sim):
        sim.store.changes_since = lambda pos: None  # what Store (SQL) answers

    def jobs(r):
        return sorted((j["job_id"], j["start_s"], j["end_s"], j["attempts"]) for j in r.jobs)

    kept = _replay(schedule, nodes=3, teams={"x": 8, "y": 8, "z": 8}, jobs=300, seed=5, stop_s=600)
    read = _replay(schedule, nodes=3, teams={"x": 8, "y": 8, "z": 8}, jobs=300, seed=5, stop_s=600, before=no_log)
    assert jobs(kept) == jobs(read)
    assert sum(j["preemptions"] for j in kept.jobs) > 0 and max(j["attempts"] for j in kept.jobs) > 1


def test_the_inlined_victim_scan_decides_what_why_decides():
    """preempt_for's victim scan inlines why() when LAS preemption is off (rules.INLINE_SCAN).
    Every cycle of a replay with reclaim preemptions (and jobs in their preemption backoff) is
    decided both ways, and the decisions are equal."""
    import scheduler.policy.rules as rules
    import scheduler.policy.shoal as shoal

    seen = {"cycles": 0, "preempting": 0}

    def both(snap):
        fast = shoal.plan(snap)
        rules.INLINE_SCAN = False
        try:
            slow = shoal.plan(snap)
        finally:
            rules.INLINE_SCAN = True
        assert fast == slow
        seen["cycles"] += 1
        seen["preempting"] += bool(fast[0].to_preempt)
        return fast[0]

    _replay(both, nodes=2, teams={"x": 8, "y": 8}, jobs=300, seed=3,
            scheduler={"min_runtime_s": 60, "preempt_grace_s": 0})
    assert seen["cycles"] > 100 and seen["preempting"] > 10, seen


def test_policy_cycles_leave_no_reference_cycles():
    """A Shoal cycle's working state (the snapshot, the cluster copy, the jobs, the memo) is freed
    as soon as the cycle returns, by reference counting: nothing in it refers back to the cycle.
    A cycle that left a reference cycle behind made every scheduling cycle garbage that only
    CPython's cyclic collector could free - a tenth of a Philly replay's time (engine.py,
    GC_GEN0_THRESHOLD). Snapshots of a replay with waiting, borrowing and preempting jobs are
    planned again with the collector off; it then finds none of the policy's objects to free."""
    import collections
    import gc

    from scheduler.policy.shoal import plan

    snaps = []

    def keep(snap):
        if snap.pending:
            snaps.append(snap)
        return schedule(snap)

    _replay(keep, nodes=2, teams={"x": 8, "y": 8}, jobs=200, seed=3)
    assert len(snaps) > 100
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        decisions = [plan(snap)[0] for snap in snaps]
        gc.collect()
        # the policy's own objects only: threads other tests left running may make garbage meanwhile
        unreachable = collections.Counter(type(o).__qualname__ for o in gc.garbage
                                          if type(o).__module__.startswith("scheduler.policy"))
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert sum(len(d.to_start) for d in decisions) > 0 and any(d.to_preempt for d in decisions)
    assert not unreachable, unreachable.most_common(10)


def test_a_units_gth_time_is_its_sorted_times_gth(monkeypatch):
    """reserve() ranks units by the time their g-th GPU frees up (_gth_time) and lists only the
    chosen unit's times in full (_unit_times). At every reservation of a replay with sharing,
    foreign-free GPUs and gangs, for every unit, gang size and the asked memory, the two agree,
    both from the expected ends and from the cycle's ends by unit (Cycle.unit_ends, kept by the
    running index and the cycle's starts), which hold the same ends, sorted."""
    import scheduler.policy.reserve as rsv
    import scheduler.policy.state as state

    seen = {"calls": 0, "held": 0}
    real = rsv.reserve

    def checked(cluster, job_id, flavors, g, m, now, ends, multi_node, cpus, cpu_ends, unit_ends):
        by_unit: dict = {}
        for (o, i), e in ends.items():
            by_unit.setdefault(o, []).append((e, i))
        assert unit_ends == {o: sorted(v) for o, v in by_unit.items()}
        for f in flavors:
            for o in cluster.flavors[f].units:
                times = rsv._unit_times(cluster, o, m, now, ends)
                for k in range(1, 10):
                    want = times[k - 1][0] if len(times) >= k else None
                    assert rsv._gth_time(cluster, o, k, m, now, ends) == want, (o, k, m, times)
                    assert rsv._gth_time(cluster, o, k, m, now, ends, unit_ends) == want, (o, k, m, times)
                    seen["held"] += want is not None and want > now
        seen["calls"] += 1
        return real(cluster, job_id, flavors, g, m, now, ends, multi_node, cpus, cpu_ends, unit_ends)

    monkeypatch.setattr(state, "reserve", checked)
    _replay(schedule, nodes=3, teams={"x": 12, "y": 12}, jobs=200, seed=7)
    assert seen["calls"] > 50 and seen["held"] > 500, seen
