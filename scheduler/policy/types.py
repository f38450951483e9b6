"""Plain, frozen data in and out of the policy. Memory in MiB; utilization as a 0..1 ratio."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class GpuView:
    index: int  # device index on its node (what CUDA_VISIBLE_DEVICES names)
    model: str  # flavor, e.g. "H100 80GB"
    memory_total_mib: int
    memory_used_mib: int  # LIVE reading (NVML): includes processes Shoal does not own
    utilization: float = 0.0  # LIVE SM utilization, 0..1
    healthy: bool = True  # no XID/ECC fault, still present
    reserved_mib: int = 0  # what Shoal's running jobs are estimated to hold here
    allocated_to: tuple[int, ...] = ()  # Shoal jobs placed on this GPU

    def free_mib(self, headroom_mib: int) -> int:
        """Total minus the larger of Shoal's reservation and the live reading, minus headroom:
        memory taken by foreign processes is respected even though Shoal never reserved it."""
        return self.memory_total_mib - max(self.reserved_mib, self.memory_used_mib) - headroom_mib


@dataclass(frozen=True)
class NodeView:
    node_id: str
    name: str
    gpus: tuple[GpuView, ...]
    schedulable: bool = True  # alive and not drained
    cpus: int | None = None  # CPUs the node offers to jobs; None = not limited
    cpus_held: int = 0  # CPUs Shoal's active jobs hold there

    def cpus_free(self) -> float:
        return float("inf") if self.cpus is None else self.cpus - self.cpus_held


@dataclass(frozen=True)
class JobRequest:
    job_id: int
    team: str
    priority: int
    submitted_at: float
    gpus: int
    memory_per_gpu_mib: int
    gpu_model: str | None = None  # required flavor, or any
    cpus_per_gpu: int = 1  # each GPU's worker holds this many CPUs on the same node
    shareable: bool = False  # may share a GPU with other shareable jobs (small LoRA jobs)
    expected_duration_s: float | None = None  # estimate of the remaining run time (user or estimator)
    attained_gpu_s: float = 0.0  # GPU-seconds already received in earlier attempts (LAS / Tiresias)
    user: str | None = None

    @property
    def cpus(self) -> int:
        return self.gpus * self.cpus_per_gpu


@dataclass(frozen=True)
class RunningJob:
    job_id: int
    team: str
    priority: int
    node_id: str
    gpu_indices: tuple[int, ...]
    memory_per_gpu_mib: int
    cpus: int = 0
    submitted_at: float = 0.0
    started_at: float = 0.0  # start of the current attempt
    last_checkpoint_at: float | None = None  # None = no checkpoint yet this attempt (started_at counts)
    expected_end_at: float | None = None  # estimated end of the current attempt, for reservations
    attained_gpu_s: float = 0.0  # GPU-seconds received up to attained_at (None: up to the snapshot's now)
    shareable: bool = False
    gpu_model: str | None = None  # the flavor it runs on
    preemptible: bool = True  # False while stopping, or when its spec forbids it
    stopping: bool = False  # asked to checkpoint and stop (PREEMPTING): its GPUs free up soon
    parts: tuple[tuple[str, tuple[int, ...]], ...] = ()  # multi-node: every (node_id, gpu_indices); () = one node
    restarts: int = 0  # earlier attempts that were stopped and requeued (preempted, drained), not failed
    # The running attempt keeps receiving GPU-seconds: from attained_at on, at one per GPU it holds
    # per second (the service sets it to the attempt's start, so one view serves every cycle of the
    # attempt). Read the total with attained(now).
    attained_at: float | None = None

    def placements(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        return self.parts or ((self.node_id, self.gpu_indices),)

    @property
    def gpu_count(self) -> int:
        """GPUs it holds, on every node of a gang."""
        return len(self.gpu_indices) if not self.parts else sum(len(ix) for _, ix in self.parts)

    def attained(self, now: float) -> float:
        """GPU-seconds received by `now`, all attempts including this one."""
        if self.attained_at is None:
            return self.attained_gpu_s
        return self.attained_gpu_s + self.gpu_count * max(0.0, now - self.attained_at)


@dataclass(frozen=True)
class TeamQuota:
    """A team's share of the cluster. `nominal_by_flavor` maps GPU flavor -> nominal GPUs; when it
    is empty, `nominal_gpus` is a flavor-agnostic total. Limits of None mean unlimited."""

    team: str
    nominal_gpus: int
    nominal_by_flavor: tuple[tuple[str, int], ...] = ()
    cohort: str | None = None  # teams in one cohort lend each other idle nominal quota
    borrowing_limit: int | None = None  # most GPUs above nominal the team may borrow
    lending_limit: int | None = None  # most of its idle nominal GPUs others may borrow
    weight: float = 1.0  # fair-share weight
    usage_gpu_s: float = 0.0  # decayed historical usage (GPU-seconds), computed by the service
    budget_usd: float | None = None  # $ per budget period; None = no budget
    spent_usd: float = 0.0  # spend in the current period so far


@dataclass(frozen=True)
class Cohort:
    name: str
    parent: str | None = None  # hierarchical cohorts: a cohort may borrow from its parent


@dataclass(frozen=True)
class PolicySettings:
    """Knobs of the Shoal policy (the simulator sweeps them; the cluster config sets them)."""

    share_max_utilization: float = 0.8  # a GPU shared by shareable jobs only if live util below this
    share_max_duration_s: float = 7200.0  # a shareable job expected to run longer takes a GPU of its own
    share_max_jobs: int = 2  # shareable jobs on one shared GPU, at most (0 = no limit but memory and utilization)
    min_runtime_s: float = 300.0  # a job is not preempted before it ran this long
    preempt_backoff: float = 2.0  # ... and, for reclaim or LAS, not before min_runtime_s x this ** restarts
    aging_s: float = 3600.0  # waiting time that bounds starvation (the policy documents the rule)
    backfill: bool = True
    preemption: bool = True
    over_budget: str = "no-borrowing"  # or "none": an over-budget team starts nothing new
    # -- additive knobs of the Shoal policy (scheduler/policy/shoal.py documents each rule) --
    fair_share_band: float = 1.0  # teams whose usage/entitlement ratios fall in one band of this width
    #                               rank as equals (then shortest work first); 0 = strict fair share
    fair_share_history_weight: float = 0.5  # share = (1-w) * live dominant share + w * decayed history
    multi_node: bool = False  # a gang bigger than every node of its flavor spans the fewest nodes (the
    #                           cluster config's scheduler.multi_node, default true, sets it in the service)
    max_preemptions_per_cycle: int = 16  # victims chosen per cycle, at most
    aging_ratio: float = 16.0  # a job's aging horizon = aging_s + this x its duration (or attained time)
    preempt_grace_s: float = 3600.0  # a job that waited less than this, whose GPUs are expected to free up
    #                                  within it, waits for them instead of preempting
    makespan_guard: bool = True  # a waiting job longer than the backlog's drain time goes first (shoal.py)
    defrag_factor: float = 2.0  # > 0: running jobs on one node move to free GPUs elsewhere for a gang
    #                             waiting for that node, when its wait in GPU-s >= this x their
    #                             restart cost (rules.defrag_for); 0 = off
    las_preempt_factor: float = 0.0  # > 0: a waiting job may preempt a same-priority running job of its
    #                                  own band that attained this many times more GPU-s (Tiresias-like);
    #                                  0 = off


@dataclass(frozen=True)
class Snapshot:
    nodes: tuple[NodeView, ...]
    running: tuple[RunningJob, ...]
    pending: tuple[JobRequest, ...]
    quotas: tuple[TeamQuota, ...]
    memory_headroom_mib: int = 1024
    now: float = 0.0  # the service's clock, passed in (the policy never reads a clock)
    cohorts: tuple[Cohort, ...] = ()
    settings: PolicySettings = PolicySettings()

    def quota_config(self) -> tuple:
        """The teams' quota configuration without their usage and spend (which change every cycle)."""
        return tuple((q.team, q.nominal_gpus, q.nominal_by_flavor, q.cohort, q.borrowing_limit, q.lending_limit)
                     for q in self.quotas)


@dataclass(frozen=True)
class Placement:
    """Where a job starts. `node_id`/`gpu_indices` are the first (or only) node; a multi-node gang
    lists every (node_id, gpu_indices) in `parts`, the first equal to node_id/gpu_indices."""

    node_id: str
    gpu_indices: tuple[int, ...]
    parts: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def all_parts(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        return self.parts or ((self.node_id, self.gpu_indices),)


@dataclass(frozen=True)
class Start:
    job_id: int
    placement: Placement


@dataclass(frozen=True)
class Preempt:
    job_id: int
    reason: str


@dataclass(frozen=True)
class Decision:
    to_start: tuple[Start, ...] = ()
    to_preempt: tuple[Preempt, ...] = ()
    pending: dict[int, str] = field(default_factory=dict)  # job id -> why it waits
    estimated_start: dict[int, float] = field(default_factory=dict)  # job id -> est. start (clock time)
