"""Choosing preemption victims for one blocked job.

Who may be a victim is the caller's rule (quota reclaim: borrowed work of another team in the same
cohort tree; priority: lower-priority work of the same team; LAS: much longer-served work). This
module only picks, on ONE unit (node x flavor) of the job's flavor, the cheapest set of those
candidates whose GPUs, together with what is free now, hold the gang:

  * lost work of a victim = now - its last checkpoint (or its attempt's start if none);
  * per unit, add candidates in order of (lost work, GPUs) until the gang fits, then drop any
    that turned out unnecessary (latest first);
  * over units, take the set with the least (total lost work, number of victims).

A GPU becomes usable when every Shoal job on it is a victim or already stopping and its memory
minus foreign use covers the job. Candidates must have run `min_runtime_s` and be preemptible;
the caller filters that. Victims are asked to checkpoint then stop (Preempt); the job starts in a
later cycle once they have. Gangs spanning nodes are not built by preemption.
"""
from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

from scheduler.policy.cluster import Cluster
from scheduler.policy.types import RunningJob


@dataclass(frozen=True)
class Choice:
    unit: int
    victims: tuple[RunningJob, ...]
    lost_s: float


def lost_work(r: RunningJob, now: float) -> float:
    since = r.last_checkpoint_at if r.last_checkpoint_at is not None else r.started_at
    return max(0.0, now - since)


def _usable(cluster: Cluster, o: int, m: int, gone: set[int], tenants: dict[int, tuple[int, ...]],
            avoid) -> tuple[int, dict[int, int], dict[int, list[int]]]:
    """(GPUs of unit o usable by a job of m MiB once the jobs in `gone` have left, each tenant
    GPU's count of tenants not gone, tenant -> its GPUs that count). A free GPU is usable with m
    MiB free and not avoided; a held one once every tenant is gone and its memory minus foreign
    use covers m. The counts let choose() add or drop a victim without recounting the unit."""
    u = cluster.units[o]
    n = sum(1 for free, i in u.free if free >= m and i not in avoid)
    left: dict[int, int] = {}
    on: dict[int, list[int]] = {}
    for i, held in tenants.items():
        if i in avoid or u.foreign[i] < m:
            continue
        ts = set(held)
        left[i] = k = len(ts - gone)
        if k == 0:
            n += 1
        for j in ts:
            on.setdefault(j, []).append(i)
    return n, left, on


def usable(cluster: Cluster, o: int, m: int, gone: set[int], tenants: dict[int, tuple[int, ...]],
           avoid: set[int]) -> int:
    """GPUs of unit o usable by a job of m MiB once the jobs in `gone` have left."""
    return _usable(cluster, o, m, gone, tenants, avoid)[0]


def choose(cluster: Cluster, flavors: list[str], g: int, m: int, cpg: int, now: float,
           candidates: dict[int, list[RunningJob]], stopping: dict[int, set[int]],
           held: dict[int, dict[int, tuple[int, ...]]], avoid: dict[int, set[int]]) -> Choice | None:
    """candidates: unit -> preemptible jobs there; stopping: unit -> job ids already stopping
    (unclaimed); held: unit -> {GPU index: Shoal job ids on it} for GPUs held by Shoal jobs.
    Per unit, `usable` is kept as a running count (each GPU's tenants not yet gone) instead of
    recounting the unit's GPUs for every candidate added or dropped."""
    best: Choice | None = None
    for o, cands in candidates.items():
        u = cluster.units[o]
        if u.flavor not in flavors or not u.schedulable:
            continue
        if not stopping.get(o):  # even every candidate gone and every free GPU taken would not hold the gang
            free_n, cpus_free = len(u.free) - bisect_left(u.free, (m, -1)), cluster.cpus_free[u.node_id]
            if ((free_n < g and free_n + sum(r.gpu_count for r in cands) < g)  # (sums only when needed)
                    or (cpus_free < g * cpg and cpus_free + sum(r.cpus for r in cands) < g * cpg)):
                continue
        gone = set(stopping.get(o, ()))
        usable_n, left, on = _usable(cluster, o, m, gone, held.get(o, {}), avoid.get(o, ()))
        cpus = cluster.cpus_free[u.node_id]
        chosen: list[RunningJob] = []
        for r in sorted(cands, key=lambda r: (lost_work(r, now), len(r.gpu_indices), r.job_id)):
            if usable_n >= g and cpus >= g * cpg:
                break
            chosen.append(r)
            if r.job_id not in gone:
                gone.add(r.job_id)
                for i in on.get(r.job_id, ()):
                    left[i] -= 1
                    if left[i] == 0:
                        usable_n += 1
            cpus += r.cpus
        if usable_n < g or cpus < g * cpg:
            continue
        dropped: set[int] = set()
        for r in reversed(chosen):  # drop the ones not needed after all
            mine = on.get(r.job_id, ())
            freed = sum(1 for i in mine if left[i] == 0)  # GPUs only r's leaving made usable
            if usable_n - freed >= g and cpus - r.cpus >= g * cpg:
                dropped.add(r.job_id)
                gone.discard(r.job_id)
                for i in mine:
                    left[i] += 1
                usable_n -= freed
                cpus -= r.cpus
        if dropped:
            chosen = [r for r in chosen if r.job_id not in dropped]
        if not chosen:
            continue
        lost = sum(lost_work(r, now) for r in chosen)
        if best is None or (lost, len(chosen), o) < (best.lost_s, len(best.victims), best.unit):
            best = Choice(o, tuple(chosen), lost)
    return best
