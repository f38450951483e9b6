"""`shoal simulate`: replay a trace through the real scheduler under several policies."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from scheduler.spec import SpecError
from scheduler.cli.common import _error, _num, app, err, out


@app.command()
def simulate(
    trace: str = typer.Option(..., "--trace", help="trace file (Philly CSV, generic CSV) or a Shoal store URL"),
    cluster: Path = typer.Option(..., "--cluster", help="simulated cluster YAML (nodes, GPU models, teams)"),
    policy: str = typer.Option("shoal,fifo,tiresias", "--policy", help="comma-separated: shoal, fifo, sjf, srtf, tiresias, drf"),
    jobs: Optional[int] = typer.Option(None, "--jobs", min=1, help="first N jobs by submit time (default: all)"),
    out_dir: Path = typer.Option(Path("sim-out"), "--out", help="folder for JSON, CSV, PNG and report.html"),
    fmt: str = typer.Option("auto", "--format", help="trace format: auto, philly, csv, shoal"),
    columns: Optional[str] = typer.Option(None, "--columns", help="generic CSV mapping, e.g. submit=ts,duration=run_s,gpus=n,group=vc"),
    skip_bad_rows: bool = typer.Option(False, "--skip-bad-rows", help="leave out invalid trace rows (listed in the output) instead of stopping"),
    seed: Optional[int] = typer.Option(None, "--seed", help="workload seed (overrides simulation.seed)"),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="write PNG plots and report.html"),
) -> None:
    """Replay a trace through the real scheduler loop under several policies and compare them."""
    from scheduler.sim.config import load_sim_cluster
    from scheduler.sim.runner import SimError, parse_policies, prepare, run_policies, write_all
    from scheduler.sim.traces import TraceError, read_trace
    from scheduler.sim.workload import WorkloadError

    try:
        names = parse_policies(policy)
        sc = load_sim_cluster(cluster)
        if seed is not None:
            sc = type(sc)(sc.cluster, sc.sim.model_copy(update={"seed": seed}), sc.source)
        tr = read_trace(trace, fmt, columns, skip_bad=skip_bad_rows)
        prep = prepare(tr, sc, jobs)
    except SpecError as e:
        _error(f"invalid cluster file ({len(e.problems)} problem(s)):\n" + "\n".join(f"  {p}" for p in e.problems))
        raise typer.Exit(2) from None
    except (TraceError, SimError, WorkloadError, ValueError) as e:
        _error(str(e))
        raise typer.Exit(2) from None
    if prep.skipped_rows:
        err.print(f"warning: {len(prep.skipped_rows)} bad trace row(s) left out (--skip-bad-rows); "
                  f"listed in {out_dir / 'skipped-rows.txt'}", markup=False)
    out.print(f"{len(prep.jobs)} jobs from {trace} on {sc.total_gpus} GPUs; policies: {', '.join(names)}")
    with Progress(TextColumn("{task.description:<10}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), console=out) as bar:
        def progress(name: str):  # one bar per policy, added when its run starts
            task = bar.add_task(name, total=1.0)
            return lambda frac: bar.update(task, completed=frac)

        results = run_policies(prep, sc, names, progress)
    summaries, written = write_all(out_dir, results, prep, sc, {"trace": trace, "cluster": str(cluster),
                                                               "policies": ",".join(names), "seed": sc.sim.seed},
                                   plots=plots)
    table = Table("policy", "done", "rejected", "avg JCT h", "p99 JCT h", "avg wait h", "makespan/bound",
                  "alloc (queue>0)", "Jain", "$/job", "events/s")
    for s in summaries:
        h = lambda v: _num(v / 3600.0 if v is not None else None, 2)  # noqa: E731
        table.add_row(s["policy"], str(s["jobs_completed"]), str(s["jobs_rejected"]), h(s["jct_avg_s"]),
                      h(s["jct_p99_s"]), h(s["queue_delay_avg_s"]), _num(s["makespan_vs_bound"], 3),
                      _num(s["allocation_while_queue_nonempty"], 3), _num(s["jain_fairness_teams"], 3),
                      _num(s["cost_per_completed_job_usd"], 2), _num(s["sim_events_per_s"], 0))
    out.print(table)
    out.print(f"wrote {len(written)} files to {out_dir}" + (f" (report: {out_dir / 'report.html'})" if plots else ""))

