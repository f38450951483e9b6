"""The working state of one policy cycle (shared by shoal.py and rules.py)."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

from scheduler.policy.cluster import Cluster
from scheduler.policy.quota import QuotaBook
from scheduler.policy.reserve import Reservation, reserve
from scheduler.policy.types import JobRequest, PolicySettings, Preempt, RunningJob, Snapshot, Start


_MISSING = object()


@dataclass(slots=True)
class Job:
    req: JobRequest
    flavors: list[str]  # feasible flavors, in preference order
    key: tuple
    score: float  # GPU-seconds: expected left, else attained
    dkey: str = ""  # the quota key its waiting demand claims
    aged: bool = False  # waited past its aging horizon
    static: tuple = ()  # team, priority, shape, "no estimate": the part of _one's memo key fixed per request


@dataclass
class Cycle:
    snap: Snapshot
    cluster: Cluster
    book: QuotaBook
    running: dict[int, RunningJob]
    ends: dict[tuple[int, int], float] = field(default_factory=dict)  # (unit, gpu) -> expected free time
    # node -> (end, CPUs); unit -> gpu -> job ids. The lists and inner dicts are shared with the
    # kept indexes (running.py, cluster.py): a cycle replaces them (_commit), never mutates them.
    cpu_ends: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    held: dict[int, dict[int, tuple[int, ...]]] = field(default_factory=dict)
    use: dict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(float)))
    starts: list[Start] = field(default_factory=list)
    preempts: list[Preempt] = field(default_factory=list)
    pending: dict[int, str] = field(default_factory=dict)
    eta: dict[int, float] = field(default_factory=dict)
    reservation: Reservation | None = None
    stopping: dict[int, set[int]] = field(default_factory=dict)  # unit -> stopping job ids, unclaimed
    # flavor -> unit -> id -> job; the inner dicts are read-only (not_a_victim replaces them)
    victims_ok: dict[str, dict[int, dict[int, RunningJob]]] = field(default_factory=dict)
    flavor_of: dict[int, str] = field(default_factory=dict)  # running job -> its flavor
    min_prio: dict[str, int] = field(default_factory=dict)  # team -> lowest priority among its preemptible jobs
    victim_teams: dict[str, set[str]] = field(default_factory=dict)  # flavor -> teams with preemptible jobs
    stopping_amt: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))  # quota freeing up
    reclaimed: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))
    attempts: int = 0
    gen: int = 0  # bumped by every start, preemption and claim of stopping GPUs: memo entries keyed on it see the state they saw
    memo: dict = field(default_factory=dict)  # feasibility facts that depend on the request's shape only
    fair: Any = None  # the cycle's fair-share view (shoal._FairShare)
    order: list[Any] = field(default_factory=list)  # the jobs in the order the cycle considered them
    critical: float = float("inf")  # makespan guard: expected run time from which a job sets the makespan
    drain: float = float("inf")  # makespan guard: time to run all known work on the healthy GPUs
    kept: Any = None  # the kept running index (running.py) this cycle holds until it is released
    # `ends` by unit: unit -> (end, GPU) sorted, for reserve (kept index only; None: reserve reads `ends`)
    unit_ends: dict[int, list[tuple[float, int]]] | None = None

    def not_a_victim(self, job_id: int) -> None:
        """Take a job out of the victim candidates (it is being preempted). The per-unit dicts may
        be shared with the kept running index (running.py): replaced, never mutated."""
        for units in self.victims_ok.values():
            for o, jobs in units.items():
                if job_id in jobs:
                    units[o] = {k: v for k, v in jobs.items() if k != job_id}

    def memoized(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """compute() once per key in this cycle. A key holding `gen` is valid until the next start,
        preemption or claim; one without it, for the whole cycle (facts about the request's shape)."""
        hit = self.memo.get(key, _MISSING)
        if hit is _MISSING:
            hit = self.memo[key] = compute()
        return hit


def amount(c: Cluster, flavor: str, g: int, m: int, shareable: bool) -> float:
    if not shareable:
        return float(g)
    return g * min(1.0, m / max(1, c.flavors[flavor].memory_total_mib))


def flavor_of(c: Cluster, r: RunningJob) -> str:
    o = c.by_gpu.get((r.node_id, r.gpu_indices[0])) if r.gpu_indices else None
    return c.units[o].flavor if o is not None else (r.gpu_model or "?")


def packs(req: JobRequest, s: PolicySettings) -> bool:
    """May this job join a GPU other jobs use? Shareable, and not expected to run longer than
    `share_max_duration_s`: co-tenants slow each other down for as long as they overlap, so a long
    job gets a GPU of its own (or waits for one) instead of crawling beside others for days."""
    return req.shareable and (req.expected_duration_s is None or req.expected_duration_s <= s.share_max_duration_s)


def in_backoff(r: RunningJob, now: float, min_runtime_s: float, backoff: float) -> bool:
    """Preemption backoff: a job restarted k times runs min_runtime_s x backoff^k first."""
    return bool(r.restarts) and now - r.started_at < min_runtime_s * backoff ** min(r.restarts, 24)


def sets_makespan(r: RunningJob, now: float, drain: float) -> bool:
    """Makespan guard: more than the backlog's drain time left (not for reclaim or LAS)."""
    return r.expected_end_at is not None and r.expected_end_at - now > drain


def reserve_for(cy: Cycle, req: JobRequest, flavors: list[str]) -> Reservation | None:
    """reserve() for `req` in this cycle's state, memoized: the grace check and the reservation
    step ask the same question for one job, and jobs of one shape ask it in turn while nothing
    started or was preempted (cy.gen)."""
    res = cy.memoized(("reserve", cy.gen, tuple(flavors), req.gpus, req.memory_per_gpu_mib, req.cpus),
                      lambda: reserve(cy.cluster, req.job_id, flavors, req.gpus, req.memory_per_gpu_mib, cy.snap.now,
                                      cy.ends, cy.snap.settings.multi_node, req.cpus, cy.cpu_ends, cy.unit_ends))
    return res if res is None or res.job_id == req.job_id else Reservation(req.job_id, res.at, res.parts)
