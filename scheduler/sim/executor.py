"""SimExecutor: the Executor protocol (scheduler/executor.py) on simulated time.

A job's work is its true run time on exclusive GPUs (`spec["sim"]["duration_s"]`). An attempt
makes progress at `rate` work-seconds per second after its overhead (`startup_s`, plus
`restart_overhead_s` when it resumes work done by an earlier attempt). Work is kept across
attempts: a preempted attempt stops at a checkpoint (`stop_s` after the request) and the next
attempt resumes from it, as the Ray executor's checkpoint-and-requeue does.

Shared-GPU slowdown model: when k jobs share one GPU, their aggregate throughput is
`share_throughput[k-1]` times one job alone (the last entry for larger k), split equally, so each
runs at share_throughput[k-1] / k; a multi-GPU job runs at the speed of its slowest GPU. The
default [1.0, 1.5, 1.8, 2.0] is an assumption for small LoRA jobs that leave a GPU
under-used, in the range Robroek et al. measured for collocated training runs on one A100
("An Analysis of Collocation on GPUs for Deep Learning Training", arXiv:2209.06018, 2022:
collocation raises aggregate throughput, up to 4x for small models, while each run's epoch time
grows). Measure your own jobs and set `simulation.share_throughput`.

Events are kept in heaps keyed by time, so `poll()` costs O(finished log n), not O(running).
Checkpoints are reported lazily: the next poll after a checkpoint time sends one "checkpoint"
progress event (the service stamps it with that poll's time).
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass

from scheduler.clock import Clock
from scheduler.executor import LaunchRequest, Outcome, ProgressEvent

EPS = 1e-6


@dataclass
class _Run:
    job_id: int
    attempt: int
    node_id: str  # the first (or only) node: its GPU price is the gang's (one GPU model)
    gpus: tuple[tuple[str, int], ...]  # every (node_id, index) it holds: a multi-node gang's on all nodes
    total: float
    start: float
    progress_from: float
    last: float
    rate: float = 1.0
    version: int = 0
    stopping: bool = False
    checkpoint_every_s: float = 0.0


class SimExecutor:
    def __init__(self, clock: Clock, *, share_throughput: list[float] | None = None, startup_s: float = 0.0,
                 restart_overhead_s: float = 0.0, stop_s: float = 0.0, gpu_price: dict[str, float] | None = None):
        self.clock = clock
        self.throughput = share_throughput or [1.0]
        self.startup_s = startup_s
        self.restart_overhead_s = restart_overhead_s
        self.stop_s = stop_s
        self.gpu_price = gpu_price or {}  # node_id -> $ per GPU-second
        self.work: dict[int, float] = {}  # job -> work done, all attempts (exclusive-GPU seconds)
        self.runs: dict[tuple[int, int], _Run] = {}
        self.tenants: dict[tuple[str, int], list[tuple[int, int]]] = {}
        self._heap: list[tuple[float, int, tuple[int, int], int, str]] = []  # (t, seq, key, version, kind)
        self._ckpt: list[tuple[float, int, tuple[int, int], int]] = []
        self._seq = itertools.count()
        self._done: list[Outcome] = []
        self._progress: list[ProgressEvent] = []
        self.cost_usd = 0.0
        self.cost_by_team: dict[str, float] = {}
        self.held_gpu_s = 0.0
        self.outcomes = 0  # attempt ends (for events/s)
        self._team: dict[int, str] = {}
        self._allocated = 0  # GPUs with at least one tenant

    # -- rates ----------------------------------------------------------------------------------
    def _speed(self, k: int) -> float:
        t = self.throughput[min(k, len(self.throughput)) - 1]
        return t / k

    def _rate(self, run: _Run) -> float:
        return min(self._speed(len(self.tenants[g])) for g in run.gpus)

    def _accrue(self, run: _Run, now: float) -> None:
        begin = max(run.last, run.progress_from)
        if now > begin:
            self.work[run.job_id] = self.work.get(run.job_id, 0.0) + (now - begin) * run.rate
        run.last = max(run.last, now)

    def _reschedule(self, run: _Run, now: float) -> None:
        if run.stopping:
            return  # its stop event stands: when it stops does not depend on its rate
        run.version += 1
        remaining = max(0.0, run.total - self.work.get(run.job_id, 0.0))
        end = max(now, run.progress_from) + remaining / run.rate
        heapq.heappush(self._heap, (end, next(self._seq), (run.job_id, run.attempt), run.version, "end"))

    def _retenant(self, gpus: list[tuple[str, int]], now: float) -> None:
        """The tenants of these GPUs changed: re-rate every run on them."""
        touched = {key for g in gpus for key in self.tenants.get(g, ())}
        for key in sorted(touched):
            run = self.runs[key]
            self._accrue(run, now)
            rate = self._rate(run)
            if abs(rate - run.rate) > 1e-12:
                run.rate = rate
                self._reschedule(run, now)

    # -- Executor protocol ----------------------------------------------------------------------
    def launch(self, req: LaunchRequest) -> None:
        key = (req.job_id, req.attempt)
        if key in self.runs:
            return  # idempotent: adopt
        now = self.clock.now()
        sim = req.spec.get("sim") or {}
        if "duration_s" not in sim:
            raise ValueError(f"job {req.job_id}: spec has no sim.duration_s (not a simulated job)")
        done = self.work.get(req.job_id, 0.0)
        overhead = self.startup_s + (self.restart_overhead_s if done > 0 else 0.0)
        slots = tuple((node, i) for node, ix in req.all_parts() for i in ix)
        run = _Run(req.job_id, req.attempt, req.node_id, slots, float(sim["duration_s"]), now,
                   now + overhead, now, checkpoint_every_s=float(sim.get("checkpoint_every_s") or 0.0))
        self._team[req.job_id] = req.spec.get("team", "")
        self.runs[key] = run
        gpus = list(run.gpus)
        for g in gpus:
            tenants = self.tenants.setdefault(g, [])
            if not tenants:
                self._allocated += 1
            tenants.append(key)
        run.rate = self._rate(run)
        self._retenant(gpus, now)
        self._reschedule(run, now)
        self._progress.append(ProgressEvent(req.job_id, req.attempt, {"type": "step", "step": 0}))
        if run.checkpoint_every_s:
            heapq.heappush(self._ckpt, (run.progress_from + run.checkpoint_every_s, next(self._seq), key, 1))

    def _end(self, key: tuple[int, int], status: str, now: float, metrics: dict | None = None) -> None:
        run = self.runs.pop(key)
        self._accrue(run, now)
        gpus = list(run.gpus)
        for g in gpus:
            self.tenants[g].remove(key)
            if not self.tenants[g]:
                self._allocated -= 1
        held = len(run.gpus) * (now - run.start)
        self.held_gpu_s += held
        cost = held * self.gpu_price.get(run.node_id, 0.0)
        self.cost_usd += cost
        team = self._team.get(run.job_id, "")
        self.cost_by_team[team] = self.cost_by_team.get(team, 0.0) + cost
        self._retenant(gpus, now)
        self.outcomes += 1
        self._done.append(Outcome(run.job_id, run.attempt, status, metrics or {}))

    def request_stop(self, job_id: int, attempt: int) -> None:
        run = self.runs.get((job_id, attempt))
        if run is None or run.stopping:
            return
        now = self.clock.now()
        self._accrue(run, now)
        run.stopping = True
        run.version += 1
        heapq.heappush(self._heap, (now + self.stop_s, next(self._seq), (job_id, attempt), run.version, "stop"))

    def kill(self, job_id: int, attempt: int) -> None:
        if (job_id, attempt) in self.runs:
            self._end((job_id, attempt), "killed", self.clock.now())

    def is_active(self, job_id: int, attempt: int) -> bool:
        return (job_id, attempt) in self.runs

    def next_event_time(self) -> float | None:
        """When the next attempt ends or stops (None: nothing running)."""
        while self._heap:
            t, _, key, version, _ = self._heap[0]
            run = self.runs.get(key)
            if run is not None and run.version == version:
                return t
            heapq.heappop(self._heap)
        return None

    def poll(self) -> list[Outcome]:
        now = self.clock.now()
        while self._heap and self._heap[0][0] <= now + EPS:
            t, _, key, version, kind = heapq.heappop(self._heap)
            run = self.runs.get(key)
            if run is None or run.version != version:
                continue
            if kind == "stop":
                self._end(key, "preempted", now, {"step": int(self.work.get(key[0], 0.0))})
            else:
                self.work[key[0]] = run.total  # exact, whatever the float rounding of the rates
                run.last = now
                self._end(key, "succeeded", now, {"train_loss": 0.0})
        while self._ckpt and self._ckpt[0][0] <= now + EPS:
            t, _, key, n = heapq.heappop(self._ckpt)
            run = self.runs.get(key)
            if run is None or run.stopping:
                continue
            self._progress.append(ProgressEvent(*key, {"type": "checkpoint", "step": n}))
            heapq.heappush(self._ckpt, (t + run.checkpoint_every_s, next(self._seq), key, n + 1))
        done, self._done = self._done, []
        return done

    def drain_progress(self) -> list[ProgressEvent]:
        out, self._progress = self._progress, []
        return out

    def close(self) -> None:
        self.runs.clear()

    # -- observation (metrics) ------------------------------------------------------------------
    def useful_gpus(self) -> float:
        """Exclusive-GPU equivalents of work being done right now (sum of GPUs x rate of runs
        past their overhead); with sharing this can exceed the GPUs held."""
        now = self.clock.now()
        return sum(len(r.gpus) * r.rate for r in self.runs.values() if not r.stopping and now >= r.progress_from)

    def allocated_gpus(self) -> int:
        return self._allocated
