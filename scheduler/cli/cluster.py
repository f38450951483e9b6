"""Cluster views: nodes, top (live GPUs and jobs), usage (GPU-hours and $, like sreport)."""
from __future__ import annotations

import time
from datetime import datetime
from enum import Enum
from typing import Optional

import typer
from rich.table import Table

from scheduler.client import ShoalError
from scheduler.lifecycle import JobState
from scheduler.cli.common import (_ask, _client, _emit, _error, _fail, _num, _table, _ts, app, out,
    OUTPUT, Output)


def _bar(frac: float, width: int = 10) -> str:
    n = max(0, min(width, round(frac * width)))
    return "█" * n + "·" * (width - n)


def _nodes_table(nodes) -> Table:
    t = _table("NODE", "STATE", "GPU", "MODEL", "UTIL", "MEMORY (MiB)", "HEALTH", "JOBS")
    for n in nodes:
        state = "drained" if n.drained else ("ok" if n.schedulable else "down")
        for i, g in enumerate(n.gpus):
            jobs = ",".join(map(str, g.jobs)) + (f" +{g.hidden_jobs} other" if g.hidden_jobs else "")
            t.add_row(n.name if i == 0 else "", state if i == 0 else "", str(g.index), g.model,
                      f"{_bar(g.utilization)} {g.utilization * 100:3.0f}%",
                      f"{g.memory_used_mib:>6}/{g.memory_total_mib}", "ok" if g.healthy else "[red]FAULT[/]",
                      jobs or "-")
        if not n.gpus:
            t.add_row(n.name, state, "-", "-", "-", "-", "-", "-")
    return t


@app.command()
def nodes(output: Output = OUTPUT) -> None:
    """Nodes and GPUs with live readings (utilization, memory, health) and the jobs on them."""
    client = _client()
    ns = _ask(client.nodes)
    if not _emit(ns, output):
        out.print(_nodes_table(ns))
        for n in ns:
            if n.drained:
                out.print(f"{n.name}: drained ({n.drain_reason})", highlight=False)


@app.command()
def top(interval: float = typer.Option(2.0, "--interval", "-n", help="seconds between refreshes"),
        once: bool = typer.Option(False, "--once", help="print one frame and exit")) -> None:
    """A live view of the cluster: GPUs (utilization, memory, jobs) and running and queued jobs."""
    from rich.console import Group
    from rich.live import Live

    client = _client()

    def frame():
        summary, ns = client.metrics_summary(), client.nodes()
        jobs = client.jobs(state=[s.value for s in JobState if not s.terminal], limit=200)
        head = (f"[bold]Shoal[/] {client.url}  GPUs {summary.gpus_allocated}/{summary.gpus_total} allocated, "
                f"{summary.gpus_healthy} healthy, mean util {summary.gpu_utilization_mean * 100:.0f}%  "
                f"memory {summary.memory_used_mib / 1024:.0f}/{summary.memory_total_mib / 1024:.0f} GiB  "
                + "  ".join(f"{k} {v}" for k, v in sorted(summary.jobs_by_state.items())))
        jt = _table("ID", "NAME", "TEAM", "STATE", "GPUS", "STEP", "LOSS", "TOK/S", "REASON", fold="REASON")
        for j in jobs:
            p = j.progress or {}
            jt.add_row(str(j.id), j.name, j.team, j.state.value, str(j.gpus),
                       f"{p.get('step', '-')}/{p.get('total_steps', '-')}" if p else "-",
                       _num(p.get("loss"), 4), _num(p.get("tokens_per_s"), 0),
                       (j.pending_reason or "") if j.state is JobState.QUEUED else "")
        return Group(head, _nodes_table(ns), jt)

    try:
        if once:
            out.print(frame())
            return
        with Live(frame(), console=out, refresh_per_second=4, screen=False) as live:
            while True:
                time.sleep(interval)
                live.update(frame())
    except ShoalError as e:
        raise _fail(e) from None
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


def _parse_time(value: str | None, option: str) -> float | None:
    """'1732500000' (Unix time), '2026-11-01' or '2026-11-01T12:00' (UTC), or '7d' / '12h' / '30m'
    (that long ago)."""
    if value is None:
        return None
    v = value.strip()
    units = {"d": 86400, "h": 3600, "m": 60}
    try:
        if v[-1:] in units and v[:-1].replace(".", "", 1).isdigit():
            return time.time() - float(v[:-1]) * units[v[-1]]
        if v.replace(".", "", 1).isdigit():
            return float(v)
        dt = datetime.fromisoformat(v)
        if dt.tzinfo is None:
            from datetime import timezone
            dt = dt.replace(tzinfo=timezone.utc)
        return dt.timestamp()
    except ValueError:
        _error(f"{option}: {value!r} is not a time (Unix seconds, an ISO date like 2026-11-01, or 7d / 12h / 30m ago)")
        raise typer.Exit(2) from None


class ReportOutput(str, Enum):
    table = "table"
    json = "json"
    yaml = "yaml"
    csv = "csv"


@app.command()
def usage(since: Optional[str] = typer.Option(None, "--since", "-S", help="start: Unix time, ISO date (UTC), or "
                                              "7d/12h ago; default: start of the budget period"),
          until: Optional[str] = typer.Option(None, "--until", "-E", help="end (same forms); default now"),
          by: str = typer.Option("team", "--by", help="comma-separated: team,user,job_id,gpu_model,node"),
          team: Optional[str] = typer.Option(None, "--team", "-t"),
          user: Optional[str] = typer.Option(None, "--user", "-u"),
          output: ReportOutput = typer.Option(ReportOutput.table, "--output", "-o", help="table, json, yaml or csv")) -> None:
    """GPU-hours and cost by team / user / job / GPU model / node over a window (sreport / sacct)."""
    client = _client()
    kw = dict(since=_parse_time(since, "--since"), until=_parse_time(until, "--until"), team=team, user=user)
    keys = [k.strip() for k in by.split(",") if k.strip()]
    try:
        if output is ReportOutput.csv:
            out.out(client.usage_csv(by=keys, **kw), end="", highlight=False)
            return
        report = client.usage(by=keys, **kw)
    except ShoalError as e:
        raise _fail(e) from None
    if output is not ReportOutput.table:
        _emit(report, Output(output.value))
        return
    out.print(f"Usage {_ts(report.since)} .. {_ts(report.until)}", highlight=False)
    t = _table(*(k.upper() for k in report.by), "GPU-HOURS", "COST $", "JOBS")
    for r in report.rows:
        t.add_row(*(r.key[k] for k in report.by), f"{r.gpu_hours:.2f}", f"{r.cost_usd:,.2f}", str(r.jobs))
    t.add_row(*(["TOTAL"] + [""] * (len(report.by) - 1)), f"{report.total_gpu_hours:.2f}",
              f"{report.total_cost_usd:,.2f}", "")
    out.print(t)

