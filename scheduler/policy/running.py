"""The running jobs' part of a cycle's index, kept across cycles and updated by difference.

A cycle needs, from the running jobs: quota usage per team and key, fair-share usage per team and
flavor, when each held GPU and each node's CPUs free up, the jobs that are stopping, the jobs that
may be preempted (past `min_runtime_s`) and the makespan guard's sums. Building that from every
running job each cycle was the largest fixed cost of a cycle (O(running jobs) of Python per
cycle, whatever changed). The service hands the policy one view object per attempt, so between
two cycles only a few views differ (starts, ends, preemptions, state changes); `RunningIndex`
keeps the aggregates and applies just those differences, and a cycle copies what it will mutate
(C-level dict and list copies).

Identical to a fresh scan (`scan` below, kept as the reference and tested against this on every
cycle of a replay), including the floating-point sums and every dict's iteration order that a
decision could depend on: sums are added in job-id order (the snapshot's order) from 0.0 with
plain additions; victims, stopping GPUs and per-unit orders are rebuilt in job-id order. A
changed layout, quota configuration or `min_runtime_s`, or a clock that went backwards, starts a
fresh index.
"""
from __future__ import annotations

import heapq
import math
import operator
from bisect import bisect_left, bisect_right, insort
from functools import reduce
from typing import Any

from scheduler.policy.cluster import Cluster
from scheduler.policy.reserve import INF
from scheduler.policy.state import Cycle, amount, flavor_of, in_backoff
from scheduler.policy.types import RunningJob

_add = operator.add


def facts(c: Cluster, r: RunningJob) -> tuple:
    """(flavor, quota amount, expected end, [(node, CPUs freed at the end)], [(unit, GPU index)],
    GPUs) of a running job: a function of its (immutable) view and the cluster's layout only."""
    flavor = flavor_of(c, r)
    parts = r.placements()
    gpus = r.gpu_count
    amt = amount(c, flavor, gpus, r.memory_per_gpu_mib, r.shareable) if flavor in c.flavors else gpus
    end = r.expected_end_at if r.expected_end_at is not None else INF
    cpu_parts = tuple((node_id, float(r.cpus) * len(ix) / max(1, gpus)) for node_id, ix in parts)
    by_gpu = c.by_gpu
    gpu_keys = tuple((o, i) for node_id, ix in parts for i in ix if (o := by_gpu.get((node_id, i))) is not None)
    return flavor, amt, end, cpu_parts, gpu_keys, gpus


def _latest(ends: dict[int, float]) -> float:
    """When the last of a GPU's jobs is expected to end (never before time 0)."""
    m = max(ends.values())
    return m if m > 0.0 else 0.0


def _seqsum(values) -> float:
    """0.0 + v1 + v2 + ... in order, plain float additions (sum() may compensate on newer
    Pythons; the reference scan adds one by one)."""
    return reduce(_add, values, 0.0)


class _ById(dict):
    """job id -> value, iterated in job-id order (the snapshot's order) once `ordered()` is asked."""

    __slots__ = ("sorted", "total")

    def __init__(self) -> None:
        super().__init__()
        self.sorted = True
        # sum() of the values, None when stale: put() and RunningIndex._drop reset it (the quota and
        # use groups, the only ones summed, change through nothing else)
        self.total: float | None = None

    def put(self, job_id: int, value: Any) -> None:
        if job_id not in self and self and self.sorted and job_id < next(reversed(self)):
            self.sorted = False
        self[job_id] = value
        self.total = None

    def sum(self) -> float:
        """The values added one by one in job-id order, kept until the group changes (put/_drop)."""
        if self.total is None:
            self.total = _seqsum(self.ordered().values())
        return self.total

    def ordered(self) -> "_ById":
        if not self.sorted:
            items = sorted(self.items())
            self.clear()
            self.update(items)
            self.sorted = True
        return self


class RunningIndex:
    def __init__(self, key: tuple, layout: dict, min_runtime_s: float) -> None:
        self.key = key
        self.layout = layout  # the Cluster.by_gpu object the facts were computed on
        self.min_runtime_s = min_runtime_s
        self.now = -INF
        self.views: dict[int, RunningJob] = {}
        self.facts: dict[int, tuple] = {}
        self.flavor_of: dict[int, str] = {}
        self.used: dict[tuple[str, str], _ById] = {}  # (team, quota key) -> id -> amount (teams with a quota)
        self.use: dict[tuple[str, str], _ById] = {}  # (team, flavor) -> id -> amount
        self.timed: dict[int, tuple[float, int]] = {}  # id -> (expected end, GPUs) of jobs with an expected end
        self._timed_ids: list[int] = []  # timed's ids in order (the sum of work left adds in id order)
        self.gpu_ends: dict[tuple[int, int], dict[int, float]] = {}
        self.ends: dict[tuple[int, int], float] = {}
        # ends by unit: unit -> (end, GPU) of its GPUs in `ends`, sorted; each list is replaced,
        # never mutated, when one of its GPUs' end changes (cycles share them: Cycle.unit_ends)
        self.unit_ends: dict[int, list[tuple[float, int]]] = {}
        self._held_gpus: dict[int, set[int]] = {}  # unit -> its GPUs in `ends`
        self.cpu: dict[str, dict[int, tuple[float, float]]] = {}
        self.cpu_lists: dict[str, list[tuple[float, float]]] = {}  # node -> its (end, CPUs), for cycles to share
        self.stopping: set[int] = set()
        self.eligible: dict[int, RunningJob] = {}  # preemptible, past min_runtime_s: id -> view
        # the eligible by expected end, (end, id) sorted, and the eligible ever restarted: what
        # exempt() needs to find the few that a cycle keeps from reclaim without a pass over all
        self._by_end: list[tuple[float, int]] = []
        self._restarted: set[int] = set()
        self.victims: dict[str, dict[int, _ById]] = {}  # the eligible by flavor and unit: id -> view
        self.prios: dict[str, dict[int, int]] = {}  # team -> priority -> eligible jobs
        self.victim_teams: dict[tuple[str, str], int] = {}  # (flavor, team) -> eligible jobs
        self._orders: dict[str, tuple[tuple[int, int], dict[int, _ById]]] = {}  # flavor -> (first, units in order)
        self._firsts: dict[str, dict[int, tuple[int, int]]] = {}  # flavor -> unit -> where the scan meets it
        self._stale: dict[str, set[int]] = {}  # flavor -> units whose victims changed since the last fill
        self._not_yet: list[tuple[float, int, int]] = []  # heap: (started + min_runtime, id, id(view))
        self._qkey: dict[int, str | None] = {}  # id -> its quota key (None: its team has no quota)

    # -- maintenance ----------------------------------------------------------------------
    def update(self, running: tuple[RunningJob, ...], c: Cluster, book, now: float) -> None:
        views = self.views
        get = views.get
        changed = [r for r in running if get(r.job_id) is not r]
        new = sum(1 for r in changed if r.job_id not in views)
        if len(views) + new != len(running):  # some left
            ids = {r.job_id for r in running}
            for job_id in [j for j in views if j not in ids]:
                self._remove(job_id)
        eligible = self.eligible
        for r in changed:
            job_id = r.job_id
            if job_id in views:
                if job_id in eligible and {**views[job_id].__dict__, "last_checkpoint_at": r.last_checkpoint_at} \
                        == r.__dict__:
                    self._swap(r)  # only its last checkpoint moved: nothing the index sums or orders
                    continue
                self._remove(job_id)
            self._insert(r, c, book, now)
        self.now = now
        heap, later = self._not_yet, []
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            v = views.get(entry[1])
            if v is None or id(v) != entry[2]:
                continue  # that view left (its job ended, stopped or changed state)
            if now - v.started_at >= self.min_runtime_s:  # the reference's exact test
                self._enter(v)
            else:  # the sum rounded the other way: not yet, try again next cycle
                later.append((math.nextafter(now, INF), entry[1], entry[2]))
        for entry in later:
            heapq.heappush(heap, entry)

    def _insert(self, r: RunningJob, c: Cluster, book, now: float) -> None:
        job_id = r.job_id
        f = self.facts[job_id] = facts(c, r)
        flavor, amt, end, cpu_parts, gpu_keys, gpus = f
        self.views[job_id] = r
        self.flavor_of[job_id] = flavor
        team = r.team
        if team in book.teams:
            k = self._qkey[job_id] = book.key(team, flavor)
            self.used.setdefault((team, k), _ById()).put(job_id, amt)
        else:
            self._qkey[job_id] = None
        self.use.setdefault((team, flavor), _ById()).put(job_id, amt)
        if r.expected_end_at is not None:
            self.timed[job_id] = (end, gpus)
            insort(self._timed_ids, job_id)
        for node_id, cpus in cpu_parts:
            on = self.cpu.setdefault(node_id, {})
            on[job_id] = (end, cpus)
            self.cpu_lists[node_id] = list(on.values())
        for k in gpu_keys:
            ends = self.gpu_ends.setdefault(k, {})
            ends[job_id] = end
            self.ends[k] = _latest(ends)
            self._held_gpus.setdefault(k[0], set()).add(k[1])
        self._resort(gpu_keys)
        if r.stopping:
            self.stopping.add(job_id)
        elif gpu_keys and r.preemptible:
            if now - r.started_at >= self.min_runtime_s:
                self._enter(r)
            else:
                heapq.heappush(self._not_yet, (r.started_at + self.min_runtime_s, job_id, id(r)))

    def _resort(self, gpu_keys: tuple) -> None:
        """unit_ends again for the units of these (unit, GPU) keys, from `ends`."""
        ends, unit_ends = self.ends, self.unit_ends
        for o in {o for o, _ in gpu_keys}:
            held = sorted((ends[(o, i)], i) for i in self._held_gpus.get(o, ()))
            if held:
                unit_ends[o] = held
            else:
                unit_ends.pop(o, None)

    def _swap(self, r: RunningJob) -> None:
        """Put the new view of an eligible job in its old view's places. Only for a view equal to the
        old one but for `last_checkpoint_at`, which no fact, sum or order of the index reads (the
        cycle's victim choice reads it from the view): the same index as _remove + _insert, without
        recomputing them (a running job checkpoints far more often than it changes otherwise)."""
        job_id = r.job_id
        self.views[job_id] = self.eligible[job_id] = r
        units = self.victims[self.facts[job_id][0]]
        for o, _ in self.facts[job_id][4]:
            units[o][job_id] = r  # an existing key: its place in the unit's order stays

    def _remove(self, job_id: int) -> None:
        r = self.views.pop(job_id)
        flavor, amt, end, cpu_parts, gpu_keys, gpus = self.facts.pop(job_id)
        del self.flavor_of[job_id]
        k = self._qkey.pop(job_id)
        if k is not None:
            self._drop(self.used, (r.team, k), job_id)
        self._drop(self.use, (r.team, flavor), job_id)
        if self.timed.pop(job_id, None) is not None:
            ids = self._timed_ids
            del ids[bisect_left(ids, job_id)]
        for node_id, _ in cpu_parts:
            on = self.cpu[node_id]
            del on[job_id]
            if on:
                self.cpu_lists[node_id] = list(on.values())
            else:
                del self.cpu[node_id], self.cpu_lists[node_id]
        for key in gpu_keys:
            ends = self.gpu_ends[key]
            ends.pop(job_id, None)
            if ends:
                self.ends[key] = _latest(ends)
            else:
                del self.gpu_ends[key], self.ends[key]
                self._held_gpus[key[0]].discard(key[1])
        self._resort(gpu_keys)
        self.stopping.discard(job_id)
        self._leave(job_id, r, flavor, gpu_keys)  # a heap entry, if any, no longer matches the view

    def _enter(self, r: RunningJob) -> None:
        job_id = r.job_id
        if job_id in self.eligible:
            return
        self.eligible[job_id] = r
        if r.expected_end_at is not None:
            insort(self._by_end, (r.expected_end_at, job_id))
        if r.restarts:
            self._restarted.add(job_id)
        flavor, gpu_keys = self.facts[job_id][0], self.facts[job_id][4]
        units = self.victims.setdefault(flavor, {})
        stale = self._stale.setdefault(flavor, set())
        for o, _ in gpu_keys:
            units.setdefault(o, _ById()).put(job_id, r)
            stale.add(o)
        p = self.prios.setdefault(r.team, {})
        p[r.priority] = p.get(r.priority, 0) + 1
        k = (flavor, r.team)
        self.victim_teams[k] = self.victim_teams.get(k, 0) + 1

    def _leave(self, job_id: int, r: RunningJob, flavor: str, gpu_keys: tuple) -> None:
        if self.eligible.pop(job_id, None) is None:
            return
        if r.expected_end_at is not None:
            by_end = self._by_end
            del by_end[bisect_left(by_end, (r.expected_end_at, job_id))]
        self._restarted.discard(job_id)
        units = self.victims[flavor]
        stale = self._stale.setdefault(flavor, set())
        for o, _ in gpu_keys:
            stale.add(o)
            on = units.get(o)
            if on is not None and on.pop(job_id, None) is not None and not on:
                del units[o]
        if not units:
            del self.victims[flavor]
        p = self.prios[r.team]
        p[r.priority] -= 1
        if not p[r.priority]:
            del p[r.priority]
            if not p:
                del self.prios[r.team]
        k = (flavor, r.team)
        self.victim_teams[k] -= 1
        if not self.victim_teams[k]:
            del self.victim_teams[k]

    @staticmethod
    def _drop(groups: dict, key: tuple, job_id: int) -> None:
        g = groups[key]
        del g[job_id]
        g.total = None
        if not g:
            del groups[key]

    def exempt(self, now: float, drain: float, min_runtime_s: float, backoff: float) -> set[int]:
        """The eligible jobs kept from reclaim and LAS at `now` (rules._exempt): those with more
        than `drain` seconds left (a suffix of the eligible by expected end: `end - now` grows
        with `end`) and those still in their preemption backoff."""
        by_end = self._by_end
        out = {job_id for _, job_id in by_end[bisect_right(by_end, drain, key=lambda e: e[0] - now):]}
        views = self.views
        out.update(job_id for job_id in self._restarted if in_backoff(views[job_id], now, min_runtime_s, backoff))
        return out

    # -- the cycle's copy -----------------------------------------------------------------
    def fill(self, cy: Cycle, now: float) -> tuple[float, float]:
        """Put the running jobs' part of the index into a fresh cycle; returns the makespan guard's
        (latest expected end from now, GPU-seconds left) of the running jobs."""
        book = cy.book
        # quota and fair-share usage, each summed in job-id order as the reference scan does
        for key, g in self.used.items():
            book.used[key] = g.sum()
        use = cy.use
        for (team, flavor), g in self.use.items():
            use[team][flavor] = g.sum()
        cy.flavor_of.update(self.flavor_of)
        cy.ends.update(self.ends)
        cy.unit_ends = dict(self.unit_ends)  # shared lists: _commit replaces a unit's, never mutates it
        cy.cpu_ends.update(self.cpu_lists)  # shared: a cycle replaces a node's list, never appends to it
        views, fcts, qkey = self.views, self.facts, self._qkey
        for job_id in sorted(self.stopping):
            r, (flavor, amt, _, _, gpu_keys, _) = views[job_id], fcts[job_id]
            qk = qkey[job_id]
            if qk is not None:
                cy.stopping_amt[(r.team, qk)] += amt
            for o, _ in gpu_keys:
                cy.stopping.setdefault(o, set()).add(job_id)
        # the reference inserts units and flavors as it meets their first eligible job (id order;
        # a gang's units in its placement's order); a preemption's scan follows that order
        for team, prios in self.prios.items():
            cy.min_prio[team] = min(prios)
        for flavor, team in self.victim_teams:
            cy.victim_teams.setdefault(flavor, set()).add(team)
        for flavor, stale in self._stale.items():  # units in the reference's order, after a change
            units = self.victims.get(flavor)
            if units is None:
                self._orders.pop(flavor, None)
                self._firsts.pop(flavor, None)
                continue
            first = self._firsts.setdefault(flavor, {})
            for o in stale:  # only the units whose victims changed
                on = units.get(o)
                if on is None:
                    first.pop(o, None)
                else:
                    first[o] = _first(on.ordered(), o, fcts)
            order = sorted(first, key=first.__getitem__)
            self._orders[flavor] = (first[order[0]], {o: units[o] for o in order})
        self._stale.clear()
        # shallow copies: the per-unit dicts are shared, and a cycle replaces rather than mutates them
        for flavor in sorted(self._orders, key=lambda f: self._orders[f][0]):
            cy.victims_ok[flavor] = dict(self._orders[flavor][1])
        timed = self.timed
        if not timed:
            return 0.0, 0.0
        latest = max(0.0, max(e for e, _ in timed.values()) - now)
        # in id order (a sorted list kept by insertion, not a re-sort of the dict per cycle)
        work = _seqsum((e - now) * g if e > now else 0.0 for e, g in map(timed.__getitem__, self._timed_ids))
        return latest, work


def _first(on: _ById, o: int, fcts: dict[int, tuple]) -> tuple[int, int]:
    """Where the reference scan first meets unit o: (its lowest job id, o's place in that job's GPUs)."""
    job_id = next(iter(on))
    return job_id, next(n for n, (u, _) in enumerate(fcts[job_id][4]) if u == o)


# The kept index. A cycle takes it out of the slot and puts it back when it is done (release),
# so a cycle running at the same time in another thread (another Service in the process) finds the
# slot empty and builds its own: the index and the victim sets it shares with its cycle are used
# by one cycle at a time.
_SLOT: dict[str, RunningIndex] = {}


def running_index(cy: Cycle, quota_config: tuple) -> RunningIndex:
    """The kept index for this cycle's layout, quota configuration and settings, brought up to the
    snapshot's running jobs (a fresh one when any of those changed or the clock went back). Hand
    it back with release() when the cycle is done."""
    snap, c = cy.snap, cy.cluster
    s = snap.settings
    key = (quota_config, s.min_runtime_s)  # and the layout, by identity (below)
    idx = _SLOT.pop("index", None)
    if idx is None or idx.key != key or idx.layout is not c.by_gpu or snap.now < idx.now:
        idx = RunningIndex(key, c.by_gpu, s.min_runtime_s)
    idx.update(snap.running, c, cy.book, snap.now)
    return idx


def release(idx: RunningIndex | None) -> None:
    if idx is not None:
        _SLOT["index"] = idx


def scan(cy: Cycle) -> tuple[float, float]:
    """The reference: the same part of the index from one pass over every running job (what
    `RunningIndex` keeps by difference). Returns (latest expected end from now, GPU-seconds left)."""
    snap, c = cy.snap, cy.cluster
    s, now = snap.settings, snap.now
    book, teams, use, ends, cpu_ends = cy.book, cy.book.teams, cy.use, cy.ends, cy.cpu_ends
    latest, work = 0.0, 0.0
    for r in snap.running:
        flavor, amt, end, cpu_parts, gpu_keys, gpus = facts(c, r)
        if r.expected_end_at is not None:
            left = max(0.0, end - now)
            latest = max(latest, left)
            work += left * gpus
        cy.flavor_of[r.job_id] = flavor
        team = r.team
        if team in teams:
            book.hold(team, book.key(team, flavor), amt)
        use[team][flavor] += amt
        for node_id, cpus in cpu_parts:
            cpu_ends.setdefault(node_id, []).append((end, cpus))
        for k in gpu_keys:
            ends[k] = max(ends.get(k, 0.0), end)
        if r.stopping:
            if team in teams:
                cy.stopping_amt[(team, book.key(team, flavor))] += amt
            for o, _ in gpu_keys:
                cy.stopping.setdefault(o, set()).add(r.job_id)
        elif gpu_keys and r.preemptible and now - r.started_at >= s.min_runtime_s:
            cy.min_prio[team] = min(cy.min_prio.get(team, r.priority), r.priority)
            cy.victim_teams.setdefault(flavor, set()).add(team)
            mine = cy.victims_ok.setdefault(flavor, {})
            for o, _ in gpu_keys:
                mine.setdefault(o, {})[r.job_id] = r
    return latest, work


def reset() -> None:
    """Forget the kept index (tests: decide a cycle cold)."""
    _SLOT.clear()

