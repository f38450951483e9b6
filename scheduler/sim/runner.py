"""One comparison: read a trace, make SFT jobs, run each policy through the real service loop,
write metrics (JSON, CSV), plots and the HTML report. Used by `shoal simulate` and the
benchmark."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from scheduler.policy import Decision, Snapshot
from scheduler.sim.baselines import BASELINES, ORACLES
from scheduler.sim.config import SimCluster, dump_cluster
from scheduler.sim.engine import RunResult, Simulation
from scheduler.sim.metrics import summarize, write_outputs
from scheduler.sim.traces import Trace, TraceJob
from scheduler.sim.workload import SimJob, make_jobs

POLICIES = ("shoal", *BASELINES)


class SimError(ValueError):
    pass


def resolve_policy(name: str) -> tuple[Callable[[Snapshot], Decision], bool]:
    """(policy function, sees the true run time?). 'shoal' is scheduler.policy.schedule as it
    is at run time (looked up, not imported at module load, so a new policy plugs in)."""
    if name == "shoal":
        import scheduler.policy

        return scheduler.policy.schedule, False
    if name in BASELINES:
        return BASELINES[name], name in ORACLES
    raise SimError(f"--policy: unknown policy {name!r} (known: {', '.join(POLICIES)})")


def parse_policies(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise SimError("--policy: name at least one policy")
    for n in names:
        resolve_policy(n)
    if len(set(names)) != len(names):
        raise SimError(f"--policy: a policy is named twice ({text})")
    return names


@dataclass
class Prepared:
    jobs: list[SimJob]
    folded: int  # jobs wider than the largest node, folded onto it (oversize: fold)
    trace_jobs: int
    skipped_rows: list[str]


def prepare(trace: Trace, sc: SimCluster, limit: int | None) -> Prepared:
    tjobs = trace.first(limit).jobs
    key = (lambda j: j.user) if sc.sim.map_by == "user" else (lambda j: j.group)
    unmapped = sorted({key(j) for j in tjobs if sc.team_of(j) is None})
    if unmapped:
        shown = ", ".join(unmapped[:10]) + (" ..." if len(unmapped) > 10 else "")
        raise SimError(f"{sc.source}: simulation.team_map: trace {sc.sim.map_by}(s) {shown} map to no team; "
                       "add them to team_map (or a '*' entry)")
    folded = 0
    if sc.sim.oversize == "fold":
        widest = sc.largest_node
        out: list[TraceJob] = []
        for j in tjobs:
            if j.gpus > widest:  # keep the GPU-seconds: w GPUs for duration x gpus / w
                out.append(replace(j, gpus=widest, duration_s=j.duration_s * j.gpus / widest))
                folded += 1
            else:
                out.append(j)
        tjobs = out
    jobs = make_jobs(tjobs, sc.sim.workload, sc.team_of, sc.sim.seed)
    return Prepared(jobs, folded, len(tjobs), trace.skipped)


def run_policies(prep: Prepared, sc: SimCluster, policies: list[str],
                 progress: Callable[[str], Callable[[float], None]] | None = None) -> list[RunResult]:
    results = []
    for name in policies:
        fn, oracle = resolve_policy(name)
        sim = Simulation(sc, prep.jobs, fn, name, oracle=oracle, progress=progress(name) if progress else None)
        results.append(sim.run())
    return results


def write_all(out: Path, results: list[RunResult], prep: Prepared, sc: SimCluster, meta: dict,
              plots: bool = True) -> tuple[list[dict], list[Path]]:
    from scheduler.sim.report import plot_all, write_html

    summaries = [summarize(r) for r in results]
    meta = {**meta, "jobs_from_trace": prep.trace_jobs, "rows_skipped": len(prep.skipped_rows),
            "jobs_folded_to_node_size": prep.folded, "gpus": sc.total_gpus, "cluster_yaml": dump_cluster(sc)}
    written = write_outputs(out, results, summaries, meta)
    if prep.skipped_rows:
        p = out / "skipped-rows.txt"
        p.write_text("\n".join(prep.skipped_rows) + "\n")
        written.append(p)
    if plots:
        pngs = plot_all(out, results)
        written += pngs
        written.append(write_html(out, summaries, pngs, meta))
    return summaries, written
