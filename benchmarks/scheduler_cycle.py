"""How long one policy cycle takes on a large snapshot (the service runs one every 0.5 s).

Standard setting: 100 nodes x 8 H100, 1,000 pending jobs of 1-8 GPUs from 20 teams, a quarter of
the GPUs already busy. Prints per-cycle time for the spine policy; ends with RESULT lines.
Run from the repo root: .venv/bin/python benchmarks/scheduler_cycle.py
"""
from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scheduler.policy import GpuView, JobRequest, NodeView, RunningJob, Snapshot, TeamQuota, schedule  # noqa: E402


def build(nodes: int = 100, pending: int = 1000, teams: int = 20, seed: int = 0) -> Snapshot:
    rng = random.Random(seed)
    node_views, running = [], []
    jid = 0
    for n in range(nodes):
        gpus = []
        for g in range(8):
            held = ()
            if rng.random() < 0.25:
                jid += 1
                held = (jid,)
                running.append(RunningJob(jid, f"t{rng.randrange(teams)}", 0, f"n{n}", (g,), 20000))
            gpus.append(GpuView(g, "H100 80GB", 81559, 20000 if held else 0, allocated_to=held,
                                reserved_mib=20000 if held else 0))
        node_views.append(NodeView(f"n{n}", f"n{n}", tuple(gpus)))
    reqs = tuple(JobRequest(10_000 + i, f"t{rng.randrange(teams)}", rng.choice([0, 0, 1, 5]), float(i),
                            rng.choice([1, 1, 1, 2, 4, 8]), rng.choice([8000, 20000, 60000]))
                 for i in range(pending))
    quotas = tuple(TeamQuota(f"t{t}", nodes * 8 // teams) for t in range(teams))
    return Snapshot(tuple(node_views), tuple(running), reqs, quotas)


def main() -> None:
    snap = build()
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        d = schedule(snap)
        times.append(time.perf_counter() - t0)
    print(f"snapshot: {len(snap.nodes)} nodes, {len(snap.running)} running, {len(snap.pending)} pending; "
          f"{len(d.to_start)} started, {len(d.pending)} pending")
    print(f"cycle: median {statistics.median(times) * 1e3:.1f} ms, max {max(times) * 1e3:.1f} ms over {len(times)} runs")
    print(f"RESULT schedule_cycle_ms {statistics.median(times) * 1e3:.2f}")


if __name__ == "__main__":
    main()
