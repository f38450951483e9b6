"""The discrete-event loop. It drives the production `scheduler.service.Service` (the same tick:
ingest progress and outcomes, cancels, snapshot -> policy -> commit starts and preemptions) with
a FakeClock, an in-memory store, one FakeGpuReader per simulated node and the SimExecutor.

Time jumps from event to event; the service ticks at each of:
  - job arrivals (every job submitted at or before the new time is submitted first, then one
    tick: jobs arriving in the same second are scheduled together);
  - attempt ends and checkpoint-and-stop completions reported by the executor;
  - time-driven wake-ups while jobs wait, because some decisions depend on time alone (a
    preemptive policy's priorities change as jobs attain service; a minimum runtime expires;
    aging). A policy function may carry `next_wakeup(snapshot, decision) -> time | None` saying
    exactly when (the baselines do: Tiresias at the next queue-threshold crossing, the others
    never). A policy without it (Shoal's, today) gets periodic ticks while jobs wait: `tick_s`
    (default 60 s) after the last tick, doubling after each periodic tick that changed nothing,
    up to `tick_max_s` (default 600 s), and back to `tick_s` after any arrival or end. (A
    time-independent policy loses nothing by this; a time-dependent one may act up to
    `tick_max_s` late in a quiet spell: give it `next_wakeup` to be exact.)
and ticks again at the same instant (at most `MAX_TICKS_PER_INSTANT` times) while the executor
has outcomes due, so a preemption's freed GPUs are used at once when `stop_s` is 0.

`interval_s` > 0 puts every tick on a grid instead, as a daemon whose loop runs every
`interval_s` (scheduler.interval_s) does: the service ticks at the first multiple of `interval_s`
(counted from the first arrival) at or after each of the instants above, once per grid point,
and sees everything that happened since - arrivals (submitted at their own time: queueing delay
and JCT count from it), attempt ends, a preempted job's stop (at the next cycle, no same-instant
re-tick) - when it ticks. Attempts hold their GPUs, and are charged, until the cycle that sees
them end, as in production. Slurm's main scheduling loop runs every 60 s by default
(`sched_interval`); a 60 s grid halves the ticks of the full Philly replay and moves mean JCT by
about 1 % (docs/simulator.md, session 10).

Jobs that can never run on the cluster (production's `never_fits`: wider than any node, more
than the team's nominal quota, memory larger than any GPU) are refused at submit as the API
would, and counted in the result.
"""
from __future__ import annotations

import gc
import math
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from monitoring.gpu import FakeGpuReader
from scheduler.clock import FakeClock
from scheduler.inventory import Inventory, NodeInfo
from scheduler.lifecycle import JobState
from scheduler.placement import parts as placement_parts
from scheduler.policy import Decision, JobRequest, Snapshot, never_fits
from scheduler.service import Service
from scheduler.sim.config import SimCluster
from scheduler.sim.executor import SimExecutor
from scheduler.sim.workload import SimJob
from scheduler.store.memory import MemoryStore

S = JobState
MAX_TICKS_PER_INSTANT = 5
SHARED_UTIL_PCT = 40.0  # what NVML shows for a shareable (small) job's GPU
EXCLUSIVE_UTIL_PCT = 90.0
# A replay allocates far more than it frees (the store keeps every record, event and ledger row)
# and leaves no reference cycles behind per tick, so CPython's default first-generation threshold
# (700 net allocations) ran a collection every few ticks that traversed a growing heap and found
# nothing: about a tenth of a Philly replay's time (docs/simulator.md, session 14). run() raises it.
GC_GEN0_THRESHOLD = 50_000


@contextmanager
def _fewer_collections(gen0: int = GC_GEN0_THRESHOLD):
    """CPython's cyclic collector runs less often inside (its first-generation threshold at least
    `gen0`); the process's thresholds are restored on the way out. Garbage cycles are still
    collected, later: memory, never correctness, is what the threshold trades."""
    old = gc.get_threshold()
    gc.set_threshold(max(old[0], gen0), *old[1:])
    try:
        yield
    finally:
        gc.set_threshold(*old)


class SimStore(MemoryStore):
    """MemoryStore that also keeps per-team GPUs waiting in the queue (for quota satisfaction)."""

    def __init__(self) -> None:
        super().__init__("memory://sim")
        self.queued_gpus: dict[str, int] = {}
        self.queued = 0
        self.transitions = 0  # state changes so far (a tick that made none changed nothing)

    def submit(self, **kw):
        rec = super().submit(**kw)
        self.queued_gpus[rec.team] = self.queued_gpus.get(rec.team, 0) + rec.gpus
        self.queued += 1
        return rec

    def transition(self, job_id, src, dst, **kw):
        before = self.get(job_id).state
        rec = super().transition(job_id, src, dst, **kw)
        self.transitions += 1
        if before is S.QUEUED and dst is not S.QUEUED:
            self.queued_gpus[rec.team] -= rec.gpus
            self.queued -= 1
        elif dst is S.QUEUED and before is not S.QUEUED:
            self.queued_gpus[rec.team] = self.queued_gpus.get(rec.team, 0) + rec.gpus
            self.queued += 1
        return rec


class _Dirty(set):
    """The nodes whose fake GPUs changed: marking one marks it for the node views and for the
    readings alike (each cache clears its own copy)."""

    def __init__(self, nodes):
        nodes = list(nodes)
        super().__init__(nodes)
        self.readings: set[str] = set(nodes)

    def add(self, node_id) -> None:
        super().add(node_id)
        self.readings.add(node_id)


class _Readings:
    """A GpuReader that returns readings already taken (so a node view is built from the same
    reading the service's node sync saw, without reading the fake GPUs twice)."""

    def __init__(self, readings):
        self.readings = readings

    def read(self):
        return self.readings


class CachingInventory(Inventory):
    """Inventory whose node views and GPU readings are rebuilt only for nodes marked dirty (a job
    was placed there or released from there: `ReaderLoad` marks them). The fake readers change
    only then, and so do the running jobs on the node, so the views and readings are what
    `Inventory` would build (bar the energy counters' accrual, which nothing in the loop reads),
    and a cycle costs O(changed nodes), not O(GPUs). A dirty node's GPUs are read once, for both."""

    def __init__(self, nodes: list[NodeInfo], readers: dict[str, FakeGpuReader]):
        super().__init__(lambda: nodes, readers)
        self._node_list = nodes
        self._cache: dict[str, object] = {}
        self.dirty = _Dirty(n.node_id for n in nodes)
        self._readings: dict[str, list] = {}
        self._names = {n.node_id: n.name for n in nodes}
        first = {nid: r.read()[0] for nid, r in readers.items()}
        self._models = {nid: g.model for nid, g in first.items()}
        self._memory = {nid: g.memory_total_mib for nid, g in first.items()}  # one model per fake node

    def node_views(self, running):
        if self.dirty:
            self.read()
            by_node: dict[str, list] = {}
            dirty = self.dirty
            for job in running:
                if job.parts:  # a multi-node gang: each of its nodes (RunningJob.placements)
                    for node_id, _ in job.parts:
                        if node_id in dirty:
                            by_node.setdefault(node_id, []).append(job)
                elif job.node_id in dirty:
                    by_node.setdefault(job.node_id, []).append(job)
            for node in self._node_list:
                if node.node_id in self.dirty:
                    one = Inventory(lambda: [node], {node.node_id: _Readings(self._readings[node.node_id])})
                    self._cache[node.node_id] = one.node_views(by_node.get(node.node_id, []))[0]
            self.dirty.clear()
        return tuple(self._cache[n.node_id] for n in self._node_list)

    def read(self):
        stale = self.dirty.readings
        if stale:
            for node in self._node_list:
                if node.node_id in stale:
                    self._readings[node.node_id] = self.readers[node.node_id].read() if node.alive else []
            stale.clear()
        return dict(self._readings)

    def gpu_info(self, node_id, gpu_indices):
        if node_id not in self._models or not gpu_indices:
            return None, None
        return self._models[node_id], self._memory[node_id]

    def gpu_model(self, node_id, gpu_indices):
        return self._models.get(node_id)

    def node_name(self, node_id):
        return self._names.get(node_id, node_id)


class ReaderLoad:
    """Listener: a placed job shows up on its node's fake GPUs (its memory estimate; utilization
    40 % for a shareable job, 90 % otherwise), as NVML would show it; released, it disappears.
    Also keeps the GPUs each team holds (quota satisfaction)."""

    def __init__(self, readers: dict[str, FakeGpuReader], dirty: set[str]):
        self.readers = readers
        self.dirty = dirty  # the inventory's set of nodes to rebuild
        self.held: dict[str, int] = {}
        # the store clears placement before `released`: job id -> (its nodes, GPUs held)
        self._where: dict[int, tuple[tuple[str, ...], int]] = {}

    def placed(self, job) -> None:
        shared = bool((job.spec.get("resources") or {}).get("shareable"))
        parts = placement_parts(job.placement)  # a multi-node gang shows on every node
        for node, gpus in parts:
            r = self.readers[node]
            self.dirty.add(node)
            r.detach_job(job.id)
            r.attach_job(job.id, gpus, job.memory_per_gpu_mib,
                         utilization_pct=SHARED_UTIL_PCT if shared else EXCLUSIVE_UTIL_PCT)
        count = sum(len(g) for _, g in parts)
        if job.id not in self._where:
            self.held[job.team] = self.held.get(job.team, 0) + count
        self._where[job.id] = (tuple(n for n, _ in parts), count)

    def released(self, job) -> None:
        where = self._where.pop(job.id, None)
        if where is None:
            return
        for node in where[0]:
            self.readers[node].detach_job(job.id)
            self.dirty.add(node)
        self.held[job.team] -= where[1]


@dataclass
class Timeline:
    t: list[float] = field(default_factory=list)
    allocated: list[float] = field(default_factory=list)  # fraction of GPUs with a tenant
    useful: list[float] = field(default_factory=list)  # exclusive-GPU equivalents of work / GPUs
    queue: list[int] = field(default_factory=list)  # jobs waiting


@dataclass
class RunResult:
    policy: str
    jobs: list[dict]  # one row per submitted job
    rejected: list[dict]
    timeline: Timeline
    team_satisfaction: dict[str, float | None]
    alloc_while_waiting: float | None  # time-weighted allocation ratio while the queue is non-empty
    alloc_integral: float  # ∫ allocation ratio dt over the run (seconds)
    total_gpus: int
    cost_usd: float
    cost_by_team: dict[str, float]
    wall_s: float
    ticks: int
    events: int
    start_s: float
    ticks_by_cause: dict[str, int] = field(default_factory=dict)  # arrival / executor / periodic / same_instant


class Simulation:
    def __init__(self, cluster: SimCluster, jobs: list[SimJob], policy: Callable[[Snapshot], Decision],
                 policy_name: str, *, oracle: bool = False, progress: Callable[[float], None] | None = None,
                 samples: int = 2000):
        self.sc = cluster
        self.jobs = jobs
        self.policy_name = policy_name
        self.oracle = oracle
        self.progress = progress
        self.samples = samples
        cfg = cluster.cluster
        nodes, readers, price = [], {}, {}
        for gi, group in enumerate(cfg.nodes):
            model = cfg.gpu_models[group.gpu_model]
            for n in range(group.count):
                node_id = f"{group.name or f'g{gi}'}-{n}"
                nodes.append(NodeInfo(node_id, node_id, cpus=group.cpus))
                readers[node_id] = FakeGpuReader(group.gpus_per_node, group.gpu_model,
                                                 memory_mib=int(model.memory_gib * 1024), host=node_id)
                price[node_id] = model.price_per_hour / 3600.0
        self.total_gpus = cluster.total_gpus
        self.clock = FakeClock(start=jobs[0].submit_s if jobs else 0.0)
        self.start_s = self.clock.now()
        self.store = SimStore()
        s = cluster.sim
        self.executor = SimExecutor(self.clock, share_throughput=list(s.share_throughput), startup_s=s.startup_s,
                                    restart_overhead_s=s.restart_overhead_s, stop_s=s.stop_s, gpu_price=price)
        self.inventory = CachingInventory(nodes, readers)
        self.load = ReaderLoad(readers, self.inventory.dirty)
        self.held = self.load.held  # team -> GPUs held now
        self._home = Path(tempfile.gettempdir()) / "shoal-sim"  # never written: job_logs=False
        self._hint = getattr(policy, "next_wakeup", None)
        self.wake: float | None = None  # the policy's next time-driven decision (hinting policies)
        self.service = Service(self.store, self.executor, self.inventory, cfg, self.clock, self._home,
                               listeners=[self.load], policy=self._observe(policy), job_logs=False)
        self.service.forecaster = None  # estimated starts are for people; a replay has no one to show them
        # The usage ledger's daily full recount is there for records another writer commits late
        # (accounting.TeamUsage); here the service is the store's only writer, on one clock, so the
        # incremental reads see every record (a recount only re-adds the same sums in another
        # order). Recounts at each budget period's start remain.
        self.service.views.usage_full_every_s = math.inf
        self.ticks_by_cause = {"arrival": 0, "executor": 0, "periodic": 0, "same_instant": 0}

    @property
    def ticks(self) -> int:
        return sum(self.ticks_by_cause.values())

    def _observe(self, policy: Callable[[Snapshot], Decision]) -> Callable[[Snapshot], Decision]:
        if self._hint is None:
            return policy

        def observed(snap: Snapshot) -> Decision:
            decision = policy(snap)
            self.wake = self._hint(snap, decision)
            return decision

        return observed

    # -- admission ------------------------------------------------------------------------------
    def _admit(self, job: SimJob, cache: dict, nodes, quotas) -> str | None:
        key = (job.team, job.gpus, job.memory_per_gpu_mib)
        if key not in cache:
            req = JobRequest(0, job.team, 0, 0.0, job.gpus, job.memory_per_gpu_mib,
                             cpus_per_gpu=job.spec["resources"]["cpus_per_gpu"])
            cache[key] = never_fits(req, nodes, quotas)
        return cache[key]

    def run(self) -> RunResult:
        with _fewer_collections():
            return self._run()

    def _run(self) -> RunResult:
        wall0 = time.perf_counter()
        clock, store, ex, svc = self.clock, self.store, self.executor, self.service
        nodes = self.inventory.node_views(())
        quotas = svc.views.quotas()
        cache: dict = {}
        rejected: list[dict] = []
        arrivals = self.jobs
        n, i = len(arrivals), 0
        tick_s = period = self.sc.sim.tick_s
        tick_max_s = max(tick_s, self.sc.sim.tick_max_s)
        quantum = self.sc.sim.interval_s
        last_tick = self.start_s
        span = (arrivals[-1].submit_s - arrivals[0].submit_s) if arrivals else 0.0
        sample_every = max(60.0, span / self.samples) if span else 60.0
        next_sample = self.start_s
        tl = Timeline()
        teams = sorted(self.sc.cluster.teams)
        nominal = {t: c.gpus for t, c in self.sc.cluster.teams.items()}
        sat_num = {t: 0.0 for t in teams}
        sat_den = {t: 0.0 for t in teams}
        alloc_wait = wait_time = alloc_all = 0.0
        index: dict[int, SimJob] = {}
        while True:
            now = clock.now()
            t_arr = arrivals[i].submit_s if i < n else math.inf
            t_ex = ex.next_event_time()
            t_ex = math.inf if t_ex is None else t_ex
            if not store.queued:
                t_tick = math.inf
            elif self._hint is not None:  # the policy says when time alone changes its decision
                t_tick = self.wake if self.wake is not None and self.wake > now else math.inf
            else:  # periodic ticks while jobs wait, backing off while they change nothing
                t_tick = max(last_tick + period, now)
            t = min(t_arr, t_ex, t_tick)
            periodic = t < t_arr and t < t_ex
            if t == math.inf:
                break
            if quantum > 0:  # the daemon's next cycle at or after the event (after this one)
                t = self.start_s + math.ceil((t - self.start_s) / quantum - 1e-9) * quantum
                if t <= now and self.ticks:  # the service already ticked at `now`
                    t = now + quantum
            # integrate the state that held over [now, t)
            dt = t - now
            if dt > 0:
                alloc_all += dt * ex.allocated_gpus() / self.total_gpus
                if store.queued:
                    wait_time += dt
                    alloc_wait += dt * ex.allocated_gpus() / self.total_gpus
                for team in teams:
                    h, q = self.held.get(team, 0), store.queued_gpus.get(team, 0)
                    if h + q > 0 and nominal[team] > 0:
                        sat_den[team] += dt
                        sat_num[team] += dt * min(1.0, h / min(nominal[team], h + q))
                clock.advance(dt)
            now = t
            while i < n and arrivals[i].submit_s <= now:
                job = arrivals[i]
                i += 1
                why = self._admit(job, cache, nodes, quotas)
                if why is not None:
                    rejected.append({"index": job.index, "team": job.team, "gpus": job.gpus,
                                     "duration_s": job.duration_s, "reason": why})
                    continue
                rec = store.submit(spec=job.spec_for(self.oracle), name=job.spec["name"], team=job.team,
                                   user=job.user, priority=job.priority, gpus=job.gpus,
                                   memory_per_gpu_mib=job.memory_per_gpu_mib, now=job.submit_s)
                index[rec.id] = job
            changes = store.transitions
            cause = "periodic" if periodic else ("arrival" if t_arr <= t and t_arr <= t_ex else "executor")
            for k in range(MAX_TICKS_PER_INSTANT if quantum == 0 else 1):
                svc.tick()
                self.ticks_by_cause["same_instant" if k else cause] += 1
                t_next = ex.next_event_time()
                if t_next is None or t_next > now + 1e-6:
                    break
            last_tick = now
            period = min(2 * period, tick_max_s) if periodic and store.transitions == changes else tick_s
            if now >= next_sample:
                tl.t.append(now - self.start_s)
                tl.allocated.append(ex.allocated_gpus() / self.total_gpus)
                tl.useful.append(ex.useful_gpus() / self.total_gpus)
                tl.queue.append(store.queued)
                next_sample = now + sample_every
                if self.progress:
                    self.progress(i / n if n else 1.0)
            if i >= n and store.queued and not ex.runs:
                break  # nothing runs or will arrive and the tick started nothing: the rest never start
        if self.progress:
            self.progress(1.0)
        rows = self._rows(index)
        sat = {t: (sat_num[t] / sat_den[t] if sat_den[t] > 0 else None) for t in teams}
        return RunResult(
            self.policy_name, rows, rejected, tl, sat, (alloc_wait / wait_time) if wait_time > 0 else None, alloc_all,
            self.total_gpus, ex.cost_usd, dict(ex.cost_by_team), time.perf_counter() - wall0, self.ticks,
            n + ex.outcomes, self.start_s, dict(self.ticks_by_cause),
        )

    def _rows(self, index: dict[int, SimJob]) -> list[dict]:
        rows = []
        for rec in self.store.jobs():
            job = index[rec.id]
            queued = 0.0
            since = None
            preemptions = 0
            for ev in self.store.events(rec.id):
                if ev.to_state == "QUEUED":
                    since = ev.ts
                elif since is not None:
                    queued += ev.ts - since
                    since = None
                if ev.to_state == "PREEMPTING":
                    preemptions += 1
            rows.append({
                "job_id": rec.id, "index": job.index, "team": rec.team, "user": rec.user, "gpus": rec.gpus,
                "class": job.job_class, "shareable": job.shareable, "memory_per_gpu_mib": rec.memory_per_gpu_mib,
                "duration_s": job.duration_s, "estimate_s": job.estimate_s,
                "submit_s": rec.submitted_at - self.start_s,
                "start_s": (rec.started_at - self.start_s) if rec.started_at is not None else None,
                "end_s": (rec.finished_at - self.start_s) if rec.finished_at is not None else None,
                "state": rec.state.value, "attempts": rec.attempt, "preemptions": preemptions,
                "queued_s": queued if since is None else None,
                "jct_s": (rec.finished_at - rec.submitted_at) if rec.finished_at is not None else None,
            })
        return rows


