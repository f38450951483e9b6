"""Baseline policies for the simulator, each a pure `Snapshot -> Decision` function with the same
types as `scheduler.policy.schedule`, so they run through the same service loop.

All baselines share Shoal's placement rules, so only the ORDER and PREEMPTION decisions differ:
a job gets whole, exclusive GPUs on one node (best fit: the node with the fewest free GPUs that
still has enough), with enough free CPUs and enough free memory on each GPU; GPUs are never
shared. Team quotas are ignored (one cluster-wide queue), as in the papers.

  fifo      YARN Capacity Scheduler with one queue, as the baseline in Tiresias (NSDI'19) §6:
            jobs in submit order, no preemption. A job that does not fit does not block later
            jobs that fit (YARN-CS offers free containers to the next application), which is
            the stronger variant of FIFO.
  sjf       Shortest Job First, oracle, non-preemptive: pending jobs in order of their true run
            time (the simulator gives oracles the exact `expected_duration_s`).
  srtf      Shortest Remaining Time First, oracle, preemptive: every cycle all jobs (running and
            pending) are ranked by true remaining time; a pending job preempts running jobs
            ranked after it when that makes it fit.
  tiresias  Discretized two-dimensional LAS (Gu et al., "Tiresias", NSDI'19, §4.2, the `dlas-gpu`
            scheme of their simulator): priority by attained service in GPU-seconds (GPUs x
            time), discretized into queues; thresholds `TIRESIAS_THRESHOLDS_GPU_S` = (3600,)
            GPU-seconds, i.e. two queues (K=2, the paper's default). New jobs enter Q0; within a
            queue, running jobs keep their place ahead of pending ones, pending ones in submit
            order; a job of a higher queue preempts running jobs of lower queues. Duration is
            NOT used (Tiresias is information-agnostic). The starvation knob (promote a job to Q0
            after waiting PROMOTE_KNOB x its last run) is off, as in their simulator's default
            (`solve_starvation=0`); turning it on trades average JCT for the tail.
  drf       Dominant Resource Fairness (Ghodsi et al., NSDI'11), progressive filling across
            teams: repeatedly the team with the lowest weighted dominant share (max over GPUs and
            CPUs of held / cluster total, divided by the team's weight) gets its next job (submit
            order within a team); a team whose next job does not fit is set aside for this
            cycle. No preemption (the paper's allocator is non-preemptive).
"""
from __future__ import annotations

import heapq
from collections import defaultdict
from operator import attrgetter
from typing import Callable, Iterable

from scheduler.policy.types import (
    Decision, GpuView, JobRequest, NodeView, Placement, Preempt, RunningJob, Snapshot, Start,
)

TIRESIAS_THRESHOLDS_GPU_S: tuple[float, ...] = (3600.0,)
INF = float("inf")


_SUMMARIES: dict[int, tuple[NodeView, list[GpuView], dict]] = {}


def _node_summary(n: NodeView) -> tuple[list[GpuView], dict[tuple[str, int], int]]:
    """A node's whole free GPUs and GPU -> holder map. Memoized on the (immutable) NodeView
    object, which the simulator's inventory reuses while a node is unchanged; a pure speed-up."""
    hit = _SUMMARIES.get(id(n))
    if hit is not None and hit[0] is n:
        return hit[1], hit[2]  # never mutated: `claim` replaces the list
    free = [g for g in n.gpus if g.healthy and not g.allocated_to]
    holders = {(n.node_id, g.index): j for g in n.gpus for j in g.allocated_to}
    if len(_SUMMARIES) > 100_000:
        _SUMMARIES.clear()
    _SUMMARIES[id(n)] = (n, free, holders)
    return free, holders


class _Cluster:
    """Working view of whole free GPUs per node for one cycle. `claim` takes GPUs; preemptive
    policies `claim_running` the GPUs of running jobs they keep and may plan to take the GPUs of
    running jobs ranked lower (victims)."""

    def __init__(self, snap: Snapshot):
        self.headroom = snap.memory_headroom_mib
        self.nodes: dict[str, NodeView] = {n.node_id: n for n in snap.nodes if n.schedulable}
        self.free: dict[str, list[GpuView]] = {}
        self.cpus: dict[str, float] = {}
        self.holder: dict[tuple[str, int], int] = {}  # GPU -> running job holding it
        for n in self.nodes.values():
            free, holders = _node_summary(n)
            self.free[n.node_id] = free
            self.cpus[n.node_id] = n.cpus_free()
            self.holder.update(holders)
        self.max_free = max((len(v) for v in self.free.values()), default=0)

    def _ok(self, g: GpuView, req: JobRequest, vacated: bool = False) -> bool:
        if req.gpu_model is not None and g.model != req.gpu_model:
            return False
        free = g.memory_total_mib - self.headroom if vacated else g.free_mib(self.headroom)
        return free >= req.memory_per_gpu_mib

    def fit(self, req: JobRequest) -> Placement | None:
        """Best fit on free GPUs, or None."""
        if req.gpus > self.max_free:
            return None
        best = None
        for node_id, free in self.free.items():
            if len(free) < req.gpus or self.cpus[node_id] < req.cpus:
                continue
            if best is not None and len(free) >= best[0]:
                continue
            ok = [g for g in free if self._ok(g, req)]
            if len(ok) >= req.gpus and (best is None or (len(ok), node_id) < best[:2]):
                best = (len(ok), node_id, ok)
        if best is None:
            return None
        return Placement(best[1], tuple(sorted(g.index for g in best[2])[: req.gpus]))

    def claim(self, node_id: str, indices: Iterable[int], cpus: int) -> None:
        taken = set(indices)
        self.free[node_id] = [g for g in self.free[node_id] if g.index not in taken]
        self.cpus[node_id] -= cpus
        self.max_free = max((len(v) for v in self.free.values()), default=0)

    def fit_with_victims(self, req: JobRequest, victims_ok: Callable[[int], bool],
                         running: dict[int, RunningJob]) -> tuple[str, tuple[int, ...], set[int]] | None:
        """A node where `req` fits on free GPUs plus GPUs of running jobs for which `victims_ok`
        holds (all GPUs of a victim are freed together); fewest victims, then fewest GPUs freed."""
        best = None
        for node_id, node in self.nodes.items():
            free = {g.index: g for g in self.free[node_id] if self._ok(g, req)}
            cands: dict[int, list[GpuView]] = defaultdict(list)
            for g in node.gpus:
                j = self.holder.get((node_id, g.index))
                if j is not None and j in running and victims_ok(j) and g.healthy:
                    cands[j].append(g)
            if len(free) + sum(len(v) for v in cands.values()) < req.gpus:
                continue
            # Victims that free the most usable GPUs first (fewest victims), ties by id.
            chosen, gpus, cpus = set(), dict(free), self.cpus[node_id]
            for j in sorted(cands, key=lambda j: (-len(cands[j]), j)):
                if len(gpus) >= req.gpus and cpus >= req.cpus:
                    break
                usable = [g for g in cands[j] if self._ok(g, req, vacated=True)]
                if not usable:
                    continue
                chosen.add(j)
                gpus.update({g.index: g for g in usable})
                cpus += running[j].cpus
            if len(gpus) >= req.gpus and cpus >= req.cpus and chosen:
                key = (len(chosen), node_id)
                if best is None or key < best[0]:
                    best = (key, node_id, tuple(sorted(gpus)[: req.gpus]), chosen)
        if best is None:
            return None
        return best[1], best[2], best[3]


_REASONS: dict[tuple[str, int], str] = {}


def _reason(name: str, req: JobRequest) -> str:
    key = (name, req.gpus)
    r = _REASONS.get(key)
    if r is None:
        r = _REASONS[key] = f"{name}: waiting for {req.gpus} free GPU(s) on one node"
    return r


def _greedy(snap: Snapshot, order: list[JobRequest], name: str) -> Decision:
    """Non-preemptive: start each job in `order` that fits now; the rest wait."""
    cl = _Cluster(snap)
    starts, pending = [], {}
    for req in order:
        if req.gpus > cl.max_free:  # the common case in a long queue: answered without a fit
            pending[req.job_id] = _REASONS.get((name, req.gpus)) or _reason(name, req)
            continue
        p = cl.fit(req)
        if p is None:
            pending[req.job_id] = _reason(name, req)
            continue
        starts.append(Start(req.job_id, p))
        cl.claim(p.node_id, p.gpu_indices, req.cpus)
    return Decision(to_start=tuple(starts), pending=pending)


_SUBMIT_ORDER = attrgetter("submitted_at", "job_id")


def fifo(snap: Snapshot) -> Decision:
    return _greedy(snap, sorted(snap.pending, key=_SUBMIT_ORDER), "fifo")


def _true_remaining(req: JobRequest) -> float:
    return req.expected_duration_s if req.expected_duration_s is not None else INF


def sjf(snap: Snapshot) -> Decision:
    return _greedy(snap, sorted(snap.pending, key=lambda j: (_true_remaining(j), j.submitted_at, j.job_id)), "sjf")


def _preemptive(snap: Snapshot, rank_running: Callable[[RunningJob], tuple],
                rank_pending: Callable[[JobRequest], tuple], name: str) -> Decision:
    """All jobs in one ranking (lower first). Running jobs keep their GPUs in rank order; a pending
    job starts on free GPUs if it can, else preempts running jobs ranked after it when that makes
    it fit (it starts once they have stopped). Victims' and reserved GPUs are off limits to jobs
    ranked later."""
    cl = _Cluster(snap)
    running = {r.job_id: r for r in snap.running if r.preemptible}
    stopping = {r.job_id for r in snap.running if not r.preemptible}
    items = [(rank_running(r), 0, r.job_id, r) for r in running.values()]
    items += [(rank_pending(p), 1, p.job_id, p) for p in snap.pending]
    items.sort(key=lambda x: x[:3])
    position = {jid: i for i, (_, _, jid, _) in enumerate(items)}
    # a victim must rank after the job: past the last-ranked running job there is none to find
    # (the long tail of a queue), so the node scan is skipped there - it could only return None
    last_running = max((position[jid] for jid in running), default=-1)
    kept: set[int] = set(stopping)
    victims: set[int] = set()
    failed: list[tuple[int, int, int, str | None]] = []  # shapes with no plan since the last preemption planned
    starts, preempts, pending = [], [], {}
    for i, (_, kind, jid, job) in enumerate(items):
        if kind == 0:
            if jid in victims:
                continue
            kept.add(jid)
            continue
        req: JobRequest = job
        p = cl.fit(req)
        if p is not None:
            starts.append(Start(jid, p))
            cl.claim(p.node_id, p.gpu_indices, req.cpus)
            continue
        shape = (req.gpus, req.memory_per_gpu_mib, req.cpus)
        if i >= last_running or any(req.gpu_model == f[3] and shape[0] >= f[0] and shape[1] >= f[1] and shape[2] >= f[2]
                                    for f in failed):
            plan = None
        else:
            plan = cl.fit_with_victims(
                req, lambda v: v not in kept and v not in victims and position[v] > i, running)
        if plan is None:
            # Until a preemption is planned, free GPUs and CPUs only shrink and the candidate
            # victims only thin out (they must rank after the job), so a job at least this large
            # (GPUs, memory, CPUs; same flavor) ranked later cannot find a plan either.
            if i < last_running and len(failed) < 64:
                failed.append((*shape, req.gpu_model))
            pending[jid] = _reason(name, req)
            continue
        failed.clear()  # a plan returns CPUs of victims to their node: the shapes that failed may fit
        node_id, gpus, chosen = plan
        for v in sorted(chosen):
            victims.add(v)
            preempts.append(Preempt(v, f"{name}: job {jid} ranks higher"))
        # Reserve the node's GPUs the job will take so later-ranked jobs don't grab them.
        for v in chosen:
            for idx in running[v].gpu_indices:
                cl.holder.pop((node_id, idx), None)
        cl.claim(node_id, gpus, 0)
        cl.cpus[node_id] += sum(running[v].cpus for v in chosen) - req.cpus
        pending[jid] = f"{name}: preempting {len(chosen)} lower-ranked job(s) to start"
    return Decision(to_start=tuple(starts), to_preempt=tuple(preempts), pending=pending)


def srtf(snap: Snapshot) -> Decision:
    now = snap.now

    def rr(r: RunningJob) -> tuple:
        rem = max(0.0, r.expected_end_at - now) if r.expected_end_at is not None else INF
        return (rem, r.submitted_at)

    return _preemptive(snap, rr, lambda p: (_true_remaining(p), p.submitted_at), "srtf")


def tiresias_queue(attained_gpu_s: float, thresholds: tuple[float, ...] = TIRESIAS_THRESHOLDS_GPU_S) -> int:
    """Queue index (0 = highest priority) for a job's attained GPU-seconds (a microsecond of
    tolerance, so a job is demoted at the instant computed for its crossing despite rounding)."""
    return sum(1 for t in thresholds if attained_gpu_s >= t - 1e-6)


def make_tiresias(thresholds: tuple[float, ...] = TIRESIAS_THRESHOLDS_GPU_S) -> Callable[[Snapshot], Decision]:
    """Tiresias with the given queue thresholds (GPU-seconds, ascending)."""
    th = tuple(sorted(thresholds))

    def tiresias(snap: Snapshot) -> Decision:
        # Within a queue: running jobs (by when they were submitted) ahead of pending ones.
        return _preemptive(snap,
                           lambda r: (tiresias_queue(r.attained(snap.now), th), 0, r.submitted_at),
                           lambda p: (tiresias_queue(p.attained_gpu_s, th), 1, p.submitted_at), "tiresias")

    def next_wakeup(snap: Snapshot, decision: Decision) -> float | None:
        """When a running job next crosses a queue threshold (its priority drops), so the
        simulator ticks exactly then; None when no running job will cross one."""
        stopping = {p.job_id for p in decision.to_preempt}
        pending = {p.job_id: p for p in snap.pending}
        times = []
        for attained, gpus in [(r.attained(snap.now), len(r.gpu_indices)) for r in snap.running
                               if r.job_id not in stopping] + \
                [(pending[s.job_id].attained_gpu_s, len(s.placement.gpu_indices)) for s in decision.to_start]:
            nxt = next((t for t in th if t - 1e-6 > attained), None)
            if nxt is not None and gpus:
                times.append(snap.now + (nxt - attained) / gpus)
        return min(times, default=None)

    tiresias.next_wakeup = next_wakeup
    return tiresias


tiresias = make_tiresias()




def drf(snap: Snapshot) -> Decision:
    total_gpus = sum(len(n.gpus) for n in snap.nodes if n.schedulable) or 1
    total_cpus = sum(n.cpus for n in snap.nodes if n.schedulable and n.cpus is not None)
    weight = {q.team: q.weight for q in snap.quotas}
    gpus, cpus = defaultdict(float), defaultdict(float)
    for r in snap.running:
        gpus[r.team] += len(r.gpu_indices)
        cpus[r.team] += r.cpus

    def share(team: str) -> float:
        s = gpus[team] / total_gpus
        if total_cpus:
            s = max(s, cpus[team] / total_cpus)
        return s / weight.get(team, 1.0)

    queues: dict[str, list[JobRequest]] = defaultdict(list)
    for p in sorted(snap.pending, key=lambda j: (j.submitted_at, j.job_id)):
        queues[p.team].append(p)
    cl = _Cluster(snap)
    heap = [(share(t), t) for t in queues]
    heapq.heapify(heap)
    pos = {t: 0 for t in queues}
    starts, pending = [], {}
    while heap:
        _, team = heapq.heappop(heap)
        req = queues[team][pos[team]]
        p = cl.fit(req)
        if p is None:  # the team's next job does not fit: it waits, and so do its later jobs
            for r in queues[team][pos[team]:]:
                pending[r.job_id] = _reason("drf", r)
            continue
        starts.append(Start(req.job_id, p))
        cl.claim(p.node_id, p.gpu_indices, req.cpus)
        gpus[team] += req.gpus
        cpus[team] += req.cpus
        pos[team] += 1
        if pos[team] < len(queues[team]):
            heapq.heappush(heap, (share(team), team))
    return Decision(to_start=tuple(starts), pending=pending)


def _never(snap: Snapshot, decision: Decision) -> None:
    """Decisions that change only when jobs arrive or end: no time-driven wake-up needed."""
    return None


# SRTF: as time passes only running jobs' remaining time shrinks, which never creates a new
# start or preemption; FIFO, SJF and DRF do not look at the clock at all.
for _f in (fifo, sjf, srtf, drf):
    _f.next_wakeup = _never


BASELINES: dict[str, Callable[[Snapshot], Decision]] = {
    "fifo": fifo, "sjf": sjf, "srtf": srtf, "tiresias": tiresias, "drf": drf,
}
ORACLES = frozenset({"sjf", "srtf"})  # see the true run time in expected_duration_s
