"""Builders for small simulated clusters and traces."""
from __future__ import annotations

import pytest
import yaml

from scheduler.sim.config import SimCluster, parse_sim_cluster
from scheduler.sim.engine import RunResult, Simulation
from scheduler.sim.traces import TraceJob
from scheduler.sim.workload import make_jobs


def cluster(nodes: int = 1, gpus: int = 1, teams: dict[str, int] | None = None, **sim) -> SimCluster:
    """A cluster file as a user would write it: `nodes` x `gpus` H100s, teams with quotas, and
    simulation settings without overheads (so hand arithmetic is exact) unless given."""
    settings = {"restart_overhead_s": 0, "startup_s": 0, "stop_s": 0, "tick_s": 1,
                "workload": {"estimate_sigma": 0}, **sim}
    doc = {
        "gpu_models": {"H100 80GB": {"memory_gib": 80, "price_per_hour": 3.6}},
        "nodes": [{"count": nodes, "gpus_per_node": gpus, "gpu_model": "H100 80GB"}],
        "teams": {t: {"gpus": q} for t, q in (teams or {"x": 8, "y": 8}).items()},
        "simulation": settings,
    }
    return parse_sim_cluster(yaml.safe_dump(doc), "<test>")


def trace(*rows: tuple) -> list[TraceJob]:
    """rows: (submit_s, duration_s, gpus, group)."""
    return [TraceJob(float(t), float(d), g, grp, grp, i + 2) for i, (t, d, g, grp) in enumerate(rows)]


def run(sc: SimCluster, rows, policy, name: str = "p", oracle: bool = False) -> RunResult:
    jobs = make_jobs(rows, sc.sim.workload, sc.team_of, sc.sim.seed)
    return Simulation(sc, jobs, policy, name, oracle=oracle).run()


def jct_by_index(r: RunResult) -> dict[int, float]:
    return {j["index"]: j["jct_s"] for j in r.jobs}


@pytest.fixture
def make_cluster():
    return cluster
