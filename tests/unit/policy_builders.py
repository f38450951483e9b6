"""Small builders for policy tests: clusters as data (`node(gpus=8)`, `team("a", nominal=4)`).

`snap()` overlays the running jobs onto the nodes the way the inventory does (allocated_to,
reserved memory, live memory used, CPUs held), so tests describe a cluster once."""
from __future__ import annotations

from dataclasses import replace

from scheduler.policy import GpuView, JobRequest, NodeView, PolicySettings, RunningJob, Snapshot, TeamQuota
from scheduler.policy.types import Cohort

H100, A100, L4 = "H100 80GB", "A100 40GB", "L4 24GB"
MEM = {H100: 81559, A100: 40960, L4: 23034}
NOW = 1_700_000_000.0


def node(name: str, gpus: int = 8, model: str = H100, foreign: dict[int, int] | None = None,
         util: dict[int, float] | None = None, unhealthy: tuple[int, ...] = (), schedulable: bool = True,
         cpus: int | None = None) -> NodeView:
    """`foreign`: MiB used on a GPU by processes Shoal does not own."""
    foreign, util = foreign or {}, util or {}
    return NodeView(name, name, tuple(
        GpuView(i, model, MEM[model], foreign.get(i, 0), utilization=util.get(i, 0.0), healthy=i not in unhealthy)
        for i in range(gpus)), schedulable=schedulable, cpus=cpus)


def team(name: str, nominal: int = 8, cohort: str | None = None, borrow: int | None = None,
         lend: int | None = None, weight: float = 1.0, by_flavor: dict[str, int] | None = None,
         usage: float = 0.0, budget: float | None = None, spent: float = 0.0) -> TeamQuota:
    return TeamQuota(name, nominal, tuple(sorted((by_flavor or {}).items())), cohort, borrow, lend, weight,
                     usage, budget, spent)


def job(jid: int, team: str = "a", gpus: int = 1, prio: int = 0, t: float | None = None, mem: int = 10000,
        model: str | None = None, share: bool = False, dur: float | None = None, attained: float = 0.0,
        cpg: int = 1) -> JobRequest:
    return JobRequest(jid, team, prio, NOW - 100 + jid if t is None else t, gpus, mem, model, cpg,
                      shareable=share, expected_duration_s=dur, attained_gpu_s=attained)


def run(jid: int, node: str, gpus: tuple[int, ...], team: str = "a", prio: int = 0, mem: int = 10000,
        started: float = NOW - 3600, ckpt: float | None = None, end: float | None = None, share: bool = False,
        attained: float = 0.0, stopping: bool = False, preemptible: bool = True, cpg: int = 1,
        restarts: int = 0) -> RunningJob:
    return RunningJob(jid, team, prio, node, gpus, mem, cpus=cpg * len(gpus), submitted_at=started - 10,
                      started_at=started, last_checkpoint_at=ckpt, expected_end_at=end,
                      attained_gpu_s=attained, shareable=share, preemptible=preemptible and not stopping,
                      stopping=stopping, restarts=restarts)


def overlay(nodes: list[NodeView], running: list[RunningJob]) -> tuple[NodeView, ...]:
    out = []
    for n in nodes:
        gpus = []
        for g in n.gpus:
            on = [r for r in running for nid, ix in r.placements() if nid == n.node_id and g.index in ix]
            res = sum(r.memory_per_gpu_mib for r in on)
            gpus.append(replace(g, allocated_to=tuple(r.job_id for r in on), reserved_mib=res,
                                memory_used_mib=g.memory_used_mib + res))
        held = sum(r.cpus for r in running if r.node_id == n.node_id)
        out.append(replace(n, gpus=tuple(gpus), cpus_held=held))
    return tuple(out)


def snap(nodes, pending=(), running=(), teams=None, cohorts=(), now: float = NOW, headroom: int = 1024,
         **settings) -> Snapshot:
    teams = teams if teams is not None else [team("a"), team("b")]
    return Snapshot(overlay(list(nodes), list(running)), tuple(running), tuple(pending), tuple(teams), headroom,
                    now=now, cohorts=tuple(Cohort(*c) if isinstance(c, tuple) else Cohort(c) for c in cohorts),
                    settings=PolicySettings(**settings))


def started(d) -> dict[int, tuple[str, tuple[int, ...]]]:
    return {s.job_id: (s.placement.node_id, s.placement.gpu_indices) for s in d.to_start}
