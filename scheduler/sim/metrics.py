"""Per-run metrics, and writing them as JSON and CSV.

  jct            job completion time = end - submit, over jobs that succeeded (seconds)
  queueing delay total time a job spent QUEUED (first wait and every wait after a preemption)
  makespan       last end - first submit; its lower bound is
                 max(sum of GPUs x run time / cluster GPUs, max over jobs of submit + run time)
                 (both relative to the first submit), over the jobs admitted to the cluster
  allocation     time-weighted fraction of GPUs with at least one job on them (over the run, and
                 over the time some job waited in the queue)
  utilization    useful work (sum of GPUs x true run time of the jobs that finished) / (GPUs x
                 makespan): the fraction of GPU time that did the trace's work (not overheads)
  quota satisfaction (per team)  time-weighted, over the time the team wanted GPUs (held +
                 queued > 0) and has a nominal quota: min(1, held / min(nominal, held + queued))
  Jain's index   (sum x)^2 / (n sum x^2) over the teams' quota satisfaction (1 = all equal)
  cost           GPU-seconds held (all attempts, overheads included) x the GPU model's $/hour
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from scheduler.sim.engine import RunResult


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of `values`; None when empty."""
    if not values:
        return None
    v = sorted(values)
    k = max(0, min(len(v) - 1, math.ceil(q / 100.0 * len(v)) - 1))
    return v[k]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def jain(values: list[float]) -> float | None:
    xs = [x for x in values if x is not None]
    if not xs or sum(x * x for x in xs) == 0:
        return None
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs))


def summarize(r: RunResult) -> dict:
    done = [j for j in r.jobs if j["state"] == "SUCCEEDED"]
    jct = [j["jct_s"] for j in done]
    wait = [j["queued_s"] for j in r.jobs if j["queued_s"] is not None]
    admitted = r.jobs
    lb = makespan_bound(admitted, r.total_gpus)
    ends = [j["end_s"] for j in done]
    makespan = max(ends) if ends else None
    useful = sum(j["gpus"] * j["duration_s"] for j in done)
    sat = r.team_satisfaction
    return {
        "policy": r.policy,
        "jobs_submitted": len(r.jobs) + len(r.rejected),
        "jobs_admitted": len(r.jobs),
        "jobs_rejected": len(r.rejected),
        "jobs_completed": len(done),
        "jobs_unfinished": len(r.jobs) - len(done),
        "preemptions": sum(j["preemptions"] for j in r.jobs),
        "jct_avg_s": _mean(jct),
        "jct_p50_s": percentile(jct, 50),
        "jct_p99_s": percentile(jct, 99),
        "queue_delay_avg_s": _mean(wait),
        "queue_delay_p99_s": percentile(wait, 99),
        "makespan_s": makespan,
        "makespan_lower_bound_s": lb,
        "makespan_vs_bound": (makespan / lb) if makespan and lb else None,
        "allocation_avg": (r.alloc_integral / makespan) if makespan else None,
        "allocation_while_queue_nonempty": r.alloc_while_waiting,
        "utilization_avg": (useful / (r.total_gpus * makespan)) if makespan else None,
        "jain_fairness_teams": jain([v for v in sat.values() if v is not None]),
        "quota_satisfaction": sat,
        "cost_usd": r.cost_usd,
        "cost_per_completed_job_usd": (r.cost_usd / len(done)) if done else None,
        "cost_by_team_usd": r.cost_by_team,
        "gpus": r.total_gpus,
        "sim_wall_s": r.wall_s,
        "sim_ticks": r.ticks,
        "sim_ticks_by_cause": r.ticks_by_cause,  # arrival / executor / periodic / same_instant
        "sim_events": r.events,
        "sim_events_per_s": (r.events / r.wall_s) if r.wall_s > 0 else None,
    }


def makespan_bound(jobs: list[dict], total_gpus: int) -> float | None:
    if not jobs:
        return None
    work = sum(j["gpus"] * j["duration_s"] for j in jobs) / total_gpus
    return max(work, max(j["submit_s"] + j["duration_s"] for j in jobs))


SUMMARY_COLUMNS = [
    "policy", "jobs_submitted", "jobs_admitted", "jobs_rejected", "jobs_completed", "jobs_unfinished", "preemptions",
    "jct_avg_s", "jct_p50_s", "jct_p99_s", "queue_delay_avg_s", "queue_delay_p99_s", "makespan_s",
    "makespan_lower_bound_s", "makespan_vs_bound", "allocation_avg", "allocation_while_queue_nonempty",
    "utilization_avg", "jain_fairness_teams", "cost_usd", "cost_per_completed_job_usd", "gpus", "sim_wall_s",
    "sim_ticks", "sim_events", "sim_events_per_s",
]


def write_outputs(out: Path, results: list[RunResult], summaries: list[dict], meta: dict) -> list[Path]:
    """summary.json (every metric, per-team detail, run metadata), summary.csv (one row per
    policy), and per policy jobs-<policy>.csv, timeline-<policy>.csv, rejected-<policy>.csv."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    p = out / "summary.json"
    p.write_text(json.dumps({"meta": meta, "policies": summaries}, indent=2, default=float) + "\n")
    written.append(p)
    p = out / "summary.csv"
    with p.open("w", newline="") as f:
        w = csv.DictWriter(f, SUMMARY_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for s in summaries:
            w.writerow(s)
    written.append(p)
    for r in results:
        if r.jobs:
            p = out / f"jobs-{r.policy}.csv"
            with p.open("w", newline="") as f:
                w = csv.DictWriter(f, list(r.jobs[0]))
                w.writeheader()
                w.writerows(r.jobs)
            written.append(p)
        p = out / f"timeline-{r.policy}.csv"
        with p.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["t_s", "allocated", "utilization", "queue_length"])
            w.writerows(zip(r.timeline.t, r.timeline.allocated, r.timeline.useful, r.timeline.queue))
        written.append(p)
        if r.rejected:
            p = out / f"rejected-{r.policy}.csv"
            with p.open("w", newline="") as f:
                w = csv.DictWriter(f, list(r.rejected[0]))
                w.writeheader()
                w.writerows(r.rejected)
            written.append(p)
    return written
