"""Backfill reservations (EASY backfilling, as in Slurm's backfill scheduler).

The highest-ranked job that passes its quota check but finds no GPUs gets a reservation: the
earliest time T at which some unit will hold its gang, computed from when each GPU frees up:

  free now with enough memory  -> now
  held by Shoal jobs           -> the latest expected end of its jobs (None = unknown = never),
                                  usable if its memory minus foreign use covers the job
  started earlier this cycle   -> now + that job's expected duration (unknown = never)

T for a unit is the g-th smallest of those times; the reservation takes the unit with the
smallest T (ties: the fullest unit). Lower-ranked jobs may then start on the reserved GPUs only
if they are expected to end by T (a job with no expected duration may not). When no end time is
known (T infinite) the reservation is made only for a job that has waited past the aging bound:
it then holds its GPUs idle as they free up, which is what bounds a large gang's wait.
"""
from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass

from scheduler.policy.cluster import Cluster, Part

INF = math.inf


@dataclass(frozen=True)
class Reservation:
    job_id: int
    at: float  # clock time the gang is expected to start; inf = unknown
    parts: tuple[Part, ...]

    def avoid_for(self, job_end: float | None) -> dict[int, set[int]]:
        """The GPUs a job ending at `job_end` must leave alone ({} = it may use them)."""
        if job_end is not None and job_end <= self.at:
            return {}
        return {o: set(idx) for o, idx in self.parts}


def _unit_times(cluster: Cluster, o: int, m: int, now: float, ends: dict[tuple[int, int], float]) -> list[tuple[float, int]]:
    u = cluster.units[o]
    if not u.schedulable:
        return []
    free_now = {i for free, i in u.free if free >= m} if u.free else ()
    foreign = u.foreign  # MiB free per GPU once its Shoal jobs left
    times: list[tuple[float, int]] = []
    for i in u.healthy:
        if i in free_now:
            times.append((now, i))
        else:
            end = ends.get((o, i))
            if end is not None and foreign[i] >= m:
                times.append((end if end > now else now, i))
    times.sort()
    return times


def _gth_time(cluster: Cluster, o: int, g: int, m: int, now: float, ends: dict[tuple[int, int], float],
              unit_ends: dict[int, list[tuple[float, int]]] | None = None) -> float | None:
    """`_unit_times(...)[g - 1][0]` (None when the unit has fewer than g such GPUs), without
    listing and sorting them all: the free GPUs with m MiB all come at `now`, before any held one,
    so only the held ones' ends are sorted when the free ones are too few - or, given `unit_ends`
    (`ends` by unit, sorted), walked in order until enough are found."""
    u = cluster.units[o]
    if not u.schedulable:
        return None
    free = u.free
    pos = bisect_left(free, (m, -1))
    n_free = len(free) - pos
    if n_free >= g:
        return now
    fit = {i for _, i in free[pos:]} if n_free else ()
    foreign = u.foreign
    k = g - n_free
    if unit_ends is not None:
        healthy = u.healthy
        for t, i in unit_ends.get(o, ()):
            if foreign[i] >= m and i not in fit and i in healthy:
                k -= 1
                if not k:
                    return t if t > now else now
        return None
    held = sorted([end for i in u.healthy if (end := ends.get((o, i))) is not None and foreign[i] >= m
                   and i not in fit])
    if len(held) < k:
        return None
    end = held[k - 1]
    return end if end > now else now


def _cpu_time(cluster: Cluster, node_id: str, need: float, now: float,
              cpu_ends: dict[str, list[tuple[float, float]]]) -> float:
    """Earliest time the node has `need` CPUs free, as its jobs end."""
    have = cluster.cpus_free[node_id]
    if have >= need:
        return now
    for end, cpus in sorted(cpu_ends.get(node_id, ())):
        have += cpus
        if have >= need:
            return max(now, end)
    return INF


def reserve(cluster: Cluster, job_id: int, flavors: list[str], g: int, m: int, now: float,
            ends: dict[tuple[int, int], float], multi_node: bool, cpus: float = 0.0,
            cpu_ends: dict[str, list[tuple[float, float]]] | None = None,
            unit_ends: dict[int, list[tuple[float, int]]] | None = None) -> Reservation | None:
    """The earliest start of a gang of g GPUs x m MiB on one unit of `flavors` (or, with
    `multi_node` and a gang no one node of the flavor could hold, on the fewest GPUs' earliest
    times across a flavor: Cluster.fit's rule); None if it never fits."""
    best: tuple[float, int, int] | None = None  # (at, free GPUs, unit)
    spread: tuple[float, tuple[Part, ...]] | None = None
    for flavor in flavors:
        per_unit: list[tuple[float, int, int]] = []
        # a gang one node could hold never spreads (Cluster.fit's rule): no per-GPU list for it
        spread_ok = multi_node and not cluster.one_node_holds(flavor, g, cpus)
        for o in cluster.flavors[flavor].units:
            if spread_ok:
                times = _unit_times(cluster, o, m, now, ends)
                per_unit.extend((t, o, i) for t, i in times)
                t_g = times[g - 1][0] if len(times) >= g else None
            else:
                t_g = _gth_time(cluster, o, g, m, now, ends, unit_ends)
            if t_g is not None:
                at = max(t_g, _cpu_time(cluster, cluster.units[o].node_id, cpus, now, cpu_ends or {}))
                key = (at, len(cluster.units[o].free))
                if best is None or key < best[:2]:
                    best = (key[0], key[1], o)
        if spread_ok and best is None and len(per_unit) >= g:
            per_unit.sort()
            at = per_unit[g - 1][0]
            if spread is None or at < spread[0]:
                chosen: dict[int, list[int]] = {}
                for _, o, i in per_unit[:g]:
                    chosen.setdefault(o, []).append(i)
                spread = (at, tuple((o, tuple(sorted(ix))) for o, ix in chosen.items()))
    if spread is not None and (best is None or (best[0] == INF and spread[0] < INF)):
        return Reservation(job_id, spread[0], spread[1])
    if best is None:
        return None
    o = best[2]  # the chosen unit's g earliest GPUs (only its times are listed in full)
    return Reservation(job_id, best[0], ((o, tuple(sorted(i for _, i in _unit_times(cluster, o, m, now, ends)[:g]))),))
