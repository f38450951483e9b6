"""Plots (PNG, matplotlib's non-interactive Agg backend) and one self-contained HTML report."""
from __future__ import annotations

import base64
import html
from pathlib import Path

from scheduler.sim.engine import RunResult


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_all(out: Path, results: list[RunResult]) -> list[Path]:
    plt = _plt()
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        jct = sorted(j["jct_s"] / 3600.0 for j in r.jobs if j["jct_s"] is not None)
        if jct:
            ax.plot(jct, [(i + 1) / len(jct) for i in range(len(jct))], label=r.policy)
    ax.set_xscale("log")
    ax.set_xlabel("job completion time (hours, log scale)")
    ax.set_ylabel("fraction of jobs")
    ax.set_title("JCT CDF")
    ax.grid(True, alpha=0.3)
    ax.legend()
    p = out / "jct_cdf.png"
    fig.tight_layout()
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for r in results:
        t = [x / 86400.0 for x in r.timeline.t]
        axes[0].plot(t, r.timeline.allocated, label=f"{r.policy} allocated", lw=0.8)
        axes[1].plot(t, r.timeline.useful, label=f"{r.policy} utilization", lw=0.8)
    axes[0].set_ylabel("GPUs allocated (fraction)")
    axes[1].set_ylabel("useful work (GPU fraction)")
    axes[1].set_xlabel("simulated time (days)")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Allocation and utilization over time")
    p = out / "utilization.png"
    fig.tight_layout()
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    fig, ax = plt.subplots(figsize=(9, 3.5))
    for r in results:
        ax.plot([x / 86400.0 for x in r.timeline.t], r.timeline.queue, label=r.policy, lw=0.8)
    ax.set_xlabel("simulated time (days)")
    ax.set_ylabel("jobs waiting")
    ax.set_title("Queue length over time")
    ax.grid(True, alpha=0.3)
    ax.legend()
    p = out / "queue.png"
    fig.tight_layout()
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.0f}"
    return html.escape(str(v))


ROWS = [
    ("jobs completed", "jobs_completed"), ("jobs rejected (never fit)", "jobs_rejected"),
    ("jobs unfinished", "jobs_unfinished"), ("preemptions", "preemptions"),
    ("avg JCT (s)", "jct_avg_s"), ("p50 JCT (s)", "jct_p50_s"), ("p99 JCT (s)", "jct_p99_s"),
    ("avg queueing delay (s)", "queue_delay_avg_s"), ("p99 queueing delay (s)", "queue_delay_p99_s"),
    ("makespan (s)", "makespan_s"), ("makespan lower bound (s)", "makespan_lower_bound_s"),
    ("makespan / bound", "makespan_vs_bound"), ("allocation (avg)", "allocation_avg"),
    ("allocation while jobs wait", "allocation_while_queue_nonempty"), ("utilization (avg)", "utilization_avg"),
    ("Jain's fairness (teams)", "jain_fairness_teams"), ("total $", "cost_usd"),
    ("$ per completed job", "cost_per_completed_job_usd"), ("simulated events / s", "sim_events_per_s"),
    ("simulation wall time (s)", "sim_wall_s"),
]


def write_html(out: Path, summaries: list[dict], pngs: list[Path], meta: dict) -> Path:
    head = "".join(f"<th>{html.escape(s['policy'])}</th>" for s in summaries)
    body = "".join(
        f"<tr><td>{label}</td>" + "".join(f"<td>{_fmt(s.get(key))}</td>" for s in summaries) + "</tr>"
        for label, key in ROWS
    )
    teams = sorted({t for s in summaries for t in s["quota_satisfaction"]})
    team_rows = "".join(
        f"<tr><td>{html.escape(t)}</td>" + "".join(
            f"<td>{_fmt(s['quota_satisfaction'].get(t))} / ${_fmt(s['cost_by_team_usd'].get(t))}</td>"
            for s in summaries) + "</tr>"
        for t in teams
    )
    imgs = "".join(
        f'<figure><img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{p.name}</figcaption></figure>"
        for p in pngs
    )
    meta_rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in meta.items()
                        if k != "cluster_yaml")
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>Shoal simulation report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}td:first-child{{text-align:left}}
img{{max-width:100%}}pre{{background:#f6f6f6;padding:1em}}</style></head><body>
<h1>Shoal simulation report</h1>
<h2>Run</h2><table>{meta_rows}</table>
<h2>Policies side by side</h2><table><tr><th></th>{head}</tr>{body}</table>
<h2>Per team: quota satisfaction / cost</h2><table><tr><th>team</th>{head}</tr>{team_rows}</table>
<h2>Plots</h2>{imgs}
<h2>Cluster</h2><pre>{html.escape(meta.get("cluster_yaml", ""))}</pre>
</body></html>
"""
    p = out / "report.html"
    p.write_text(doc)
    return p
