"""The simulator's cluster file: a normal Shoal cluster config (scheduler.spec.ClusterConfig:
gpu_models with $ per GPU-hour, teams with quotas and cohorts, scheduler settings, and `nodes`
groups) plus one optional `simulation:` section for what only a simulation needs:

    simulation:
      team_map: {"6214e9": research, "*": other}   # trace group (virtual cluster / queue) -> team;
                                                    # "*" catches every other group
      map_by: group                                 # or user: team_map keys are the trace's users
      seed: 0                                       # workload draws (model, method, estimates)
      tick_s: 60                                    # periodic service tick while jobs wait (policies
      tick_max_s: 600                               # without next_wakeup), backing off to this
      interval_s: 0                                 # 0: tick at each event's instant; > 0: at the
                                                    # next multiple of it, like a daemon cycling
                                                    # every interval_s (see scheduler/sim/engine.py)
      restart_overhead_s: 30                        # a resumed attempt reloads model + checkpoint
      startup_s: 0                                  # every attempt: time before the first step
      stop_s: 0                                     # checkpoint-and-stop time after a preemption
      share_throughput: [1.0, 1.5, 1.8, 2.0]        # GPU sharing: aggregate speed of k tenants
      oversize: reject                              # jobs wider than any node: reject | fold
      workload: {estimate_sigma: 0.5, classes: [...]}   # see scheduler/sim/workload.py

Without `team_map`, each trace group must be a team name itself. Errors name file:line.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from scheduler.sim.workload import WorkloadConfig
from scheduler.spec import ClusterConfig, SpecError, _parse_yaml, format_validation_error


class SimSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    team_map: dict[str, str] = Field(default={}, description="trace group (or user) -> team; '*' = any other")
    map_by: Literal["group", "user"] = Field(default="group", description="which trace column team_map keys name")
    seed: int = Field(default=0, ge=0)
    tick_s: float = Field(default=60.0, gt=0, description="service tick period while the queue is not empty")
    tick_max_s: float = Field(default=600.0, gt=0, description="the tick period backs off up to this while nothing changes")
    interval_s: float = Field(default=0.0, ge=0, le=60, description="0: the service ticks at each event's instant; "
                              "> 0: at the next multiple of this after it, as a daemon cycling every interval_s "
                              "does (scheduler.interval_s allows at most 60 s too)")
    restart_overhead_s: float = Field(default=30.0, ge=0)
    startup_s: float = Field(default=0.0, ge=0)
    stop_s: float = Field(default=0.0, ge=0)
    share_throughput: list[float] = Field(default=[1.0, 1.5, 1.8, 2.0], min_length=1)
    oversize: Literal["reject", "fold"] = "reject"
    workload: WorkloadConfig = WorkloadConfig()

    @field_validator("share_throughput")
    @classmethod
    def _throughput(cls, v: list[float]) -> list[float]:
        if v[0] != 1.0:
            raise ValueError("the first entry (one job alone on a GPU) must be 1.0")
        if any(x <= 0 for x in v) or any(b < a for a, b in zip(v, v[1:])):
            raise ValueError("must be positive and non-decreasing (aggregate throughput of k tenants)")
        return v


@dataclass(frozen=True)
class SimCluster:
    cluster: ClusterConfig
    sim: SimSettings
    source: str

    def team_of(self, job) -> str | None:
        """The team of a TraceJob: team_map[its group (or user, with map_by: user)], else the
        '*' entry; without a team_map the key itself when it is a team."""
        group = job.user if self.sim.map_by == "user" else job.group
        m = self.sim.team_map
        if not m:
            return group if group in self.cluster.teams else None
        return m.get(group, m.get("*"))

    @property
    def total_gpus(self) -> int:
        return sum(g.count * g.gpus_per_node for g in self.cluster.nodes)

    @property
    def largest_node(self) -> int:
        return max((g.gpus_per_node for g in self.cluster.nodes), default=0)


def parse_sim_cluster(text: str, source: str = "<cluster>") -> SimCluster:
    data = _parse_yaml(text, source) or {}
    if not isinstance(data, dict):
        raise SpecError([f"{source}:1: expected a mapping of fields, got {type(data).__name__}"])
    sim_data = data.pop("simulation", None) or {}
    problems: list[str] = []
    cluster = sim = None
    try:
        cluster = ClusterConfig.model_validate(data)
    except ValidationError as e:
        problems += format_validation_error(e, source, text)
    try:
        sim = SimSettings.model_validate(sim_data)
    except ValidationError as e:
        lines = [p for p in format_validation_error(e, source, None)]
        index = _simulation_lines(text)
        for err, msg in zip(e.errors(), lines):
            loc = ("simulation",) + tuple(err["loc"])
            line = next((index[loc[:i]] for i in range(len(loc), 0, -1) if loc[:i] in index), None)
            problems.append(msg.replace(f"{source}: ", f"{source}:{line}: simulation.", 1) if line else
                            msg.replace(f"{source}: ", f"{source}: simulation.", 1))
    if problems:
        raise SpecError(problems)
    assert cluster is not None and sim is not None
    if not cluster.nodes:
        raise SpecError([f"{source}: nodes: the simulated cluster needs at least one node group, e.g. "
                         "nodes: [{count: 50, gpus_per_node: 8, gpu_model: \"H100 80GB\"}]"])
    bad = sorted({t for t in sim.team_map.values() if t not in cluster.teams})
    if bad:
        raise SpecError([f"{source}: simulation.team_map: team(s) {', '.join(bad)} not in teams "
                         f"({', '.join(sorted(cluster.teams))})"])
    return SimCluster(cluster, sim, source)


def _simulation_lines(text: str) -> dict[tuple, int]:
    from scheduler.spec import _line_index
    return _line_index(text)


def load_sim_cluster(path: str | Path) -> SimCluster:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise SpecError([f"{p}: cannot read: {e.strerror}"]) from None
    return parse_sim_cluster(text, str(p))


def dump_cluster(sc: SimCluster) -> str:
    """The effective config, for the report."""
    return yaml.safe_dump({**sc.cluster.model_dump(mode="json"), "simulation": sc.sim.model_dump(mode="json")},
                          sort_keys=False)
