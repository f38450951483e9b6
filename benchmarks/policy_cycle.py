"""Cost of one Shoal policy cycle on a large snapshot (issue #3's benchmark; not a timed test).

Standard setting: 1,000 nodes x 8 GPUs (a mix of H100 80GB, A100 40GB and L4 24GB nodes), 20 %
of GPUs partly used by foreign processes, about 40 % of GPUs held by running Shoal jobs (some
shareable, most with an expected end), 10,000 pending jobs of 1-8 GPUs from 50 teams in 5 cohorts
(priorities, durations, shareable LoRA jobs, flavor constraints). Prints p50/p95 cycle time and
decisions per second for the full size, then the growth curve over GPUs (1k/2k/4k/8k at 10k
jobs) and over jobs (1k/5k/10k/20k at 8k GPUs) with the exponent of each step (1.0 = linear).
Times are wall clock AND process CPU time; the RESULT lines use CPU time (the cycle is single-
threaded, so CPU time is what it takes on an unshared core; on a shared machine wall time mostly
measures the other tenants). Run from the repo root: .venv/bin/python benchmarks/policy_cycle.py [--quick]
"""
from __future__ import annotations

import math
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scheduler.policy.cluster import _BASE, _NODE_INDEX, _NODE_UNITS  # noqa: E402
from scheduler.policy import (  # noqa: E402
    Cohort, GpuView, JobRequest, NodeView, PolicySettings, RunningJob, Snapshot, TeamQuota, schedule,
)

FLAVORS = [("H100 80GB", 81559, 0.5), ("A100 40GB", 40960, 0.3), ("L4 24GB", 23034, 0.2)]
NOW = 1_700_000_000.0


def build(nodes: int = 1000, pending: int = 10_000, teams: int = 50, cohorts: int = 5, seed: int = 0) -> Snapshot:
    rng = random.Random(seed)
    views, running = [], []
    jid = 0
    for n in range(nodes):
        model, mem, _ = rng.choices(FLAVORS, weights=[f[2] for f in FLAVORS])[0]
        gpus = []
        for g in range(8):
            foreign = rng.randrange(2000, mem // 2) if rng.random() < 0.2 else 0
            held: tuple[int, ...] = ()
            reserved = 0
            if rng.random() < 0.4:
                share = rng.random() < 0.2
                for _ in range(2 if share else 1):
                    jid += 1
                    m = rng.choice([4000, 8000]) if share else rng.choice([10000, mem // 2])
                    start = NOW - rng.randrange(60, 20000)
                    running.append(RunningJob(
                        jid, f"t{rng.randrange(teams)}", rng.choice([0, 0, 1]), f"n{n}", (g,), m, cpus=1,
                        started_at=start, last_checkpoint_at=start + rng.randrange(0, 50),
                        expected_end_at=NOW + rng.randrange(60, 30000) if rng.random() < 0.8 else None,
                        attained_gpu_s=NOW - start, shareable=share))
                    held += (jid,)
                    reserved += m
            gpus.append(GpuView(g, model, mem, max(foreign + reserved, 0), utilization=rng.random() * 0.9,
                                healthy=rng.random() > 0.002, reserved_mib=reserved, allocated_to=held))
        views.append(NodeView(f"n{n}", f"node-{n}", tuple(gpus), schedulable=rng.random() > 0.005, cpus=96,
                              cpus_held=sum(len(g.allocated_to) for g in gpus)))
    reqs = []
    for i in range(pending):
        g = rng.choice([1, 1, 1, 1, 2, 2, 4, 8])
        reqs.append(JobRequest(
            100_000 + i, f"t{rng.randrange(teams)}", rng.choice([0, 0, 0, 1, 5]), NOW - rng.randrange(0, 20000), g,
            rng.choice([6000, 12000, 20000, 30000, 60000]), rng.choice([None, None, None, "H100 80GB", "L4 24GB"]),
            shareable=(g == 1 and rng.random() < 0.3),
            expected_duration_s=rng.choice([None, 600.0, 3600.0, 36000.0]),
            attained_gpu_s=rng.choice([0.0, 0.0, 3600.0])))
    per_team = nodes * 8 // teams
    quotas = tuple(TeamQuota(f"t{t}", per_team, cohort=f"c{t % cohorts}", weight=rng.choice([1.0, 2.0]),
                             usage_gpu_s=rng.random() * 1e6, borrowing_limit=rng.choice([None, per_team]))
                   for t in range(teams))
    cohort_list = (Cohort("root"),) + tuple(Cohort(f"c{c}", "root" if c < 2 else None) for c in range(cohorts))
    return Snapshot(tuple(views), tuple(running), tuple(reqs), quotas, 1024, now=NOW, cohorts=cohort_list,
                    settings=PolicySettings())


CPU: list[float] = []  # process CPU seconds of the last timed() runs (the machine may be shared)


def timed(snap: Snapshot, runs: int) -> tuple[list[float], object]:
    times, d = [], None
    CPU.clear()
    for _ in range(runs):
        # The policy memoizes each node's index and units on the NodeView object and keeps the
        # last cluster it built (the simulator reuses unchanged views); production's inventory
        # builds new views every cycle, so every run here starts without those, as a production
        # cycle does. (The running jobs' index stays: the service hands the policy the same view
        # of a running job every cycle of its attempt.)
        _NODE_INDEX.clear()
        _NODE_UNITS.clear()
        _BASE.clear()
        t0, c0 = time.perf_counter(), time.process_time()
        d = schedule(snap)
        times.append(time.perf_counter() - t0)
        CPU.append(time.process_time() - c0)
    return times, d


def p95(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, math.ceil(0.95 * len(s)) - 1)]


def curve(label: str, sizes: list[int], make, runs: int) -> None:
    prev = None
    print(f"\ngrowth over {label}:")
    for n in sizes:
        statistics.median(timed(make(n), runs)[0])
        t = statistics.median(CPU)  # CPU time: wall time on a shared machine swings with its load
        step = f"  exponent vs previous {math.log(t / prev[1]) / math.log(n / prev[0]):.2f}" if prev else ""
        print(f"  {label} {n:>6}: p50 {t * 1e3:8.1f} ms CPU{step}")
        prev = (n, t)


def main() -> None:
    quick = "--quick" in sys.argv
    runs = 3 if quick else 11
    snap = build()
    times, d = timed(snap, runs)
    cpu = list(CPU)
    decided = len(d.to_start) + len(d.pending) + len(d.to_preempt)
    p50 = statistics.median(times)
    cpu50 = statistics.median(cpu)
    gpus = sum(len(n.gpus) for n in snap.nodes)
    print(f"snapshot: {len(snap.nodes)} nodes / {gpus} GPUs, {len(snap.running)} running, {len(snap.pending)} pending, "
          f"{len(snap.quotas)} teams")
    print(f"decision: {len(d.to_start)} start, {len(d.to_preempt)} preempt, {len(d.pending)} pending with reasons, "
          f"{len(d.estimated_start)} estimated starts")
    print(f"cycle (wall): p50 {p50 * 1e3:.1f} ms, p95 {p95(times) * 1e3:.1f} ms over {runs} runs; "
          f"{decided / p50:,.0f} decisions/s")
    print(f"cycle (process CPU): p50 {cpu50 * 1e3:.1f} ms, p95 {p95(cpu) * 1e3:.1f} ms; "
          f"{decided / cpu50:,.0f} decisions/s (wall > CPU means other processes shared the cores)")
    curve("GPUs", [1000, 2000, 4000, 8000], lambda g: build(nodes=g // 8), max(2, runs // 3))
    curve("jobs", [1000, 5000, 10000, 20000], lambda j: build(pending=j), max(2, runs // 3))
    # The cycle is single-threaded: its CPU time is its wall time on an unshared core. On a shared
    # machine wall time measures the other tenants, so the RESULT lines use CPU time.
    print(f"\nRESULT policy_cycle_p50_s {cpu50:.4f}")
    print(f"RESULT policy_decisions_per_s {decided / cpu50:.0f}")


if __name__ == "__main__":
    main()
