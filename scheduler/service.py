"""The control loop. One `tick()`:

  1. ingest progress the running jobs sent (first progress moves STARTING -> RUNNING);
  2. ingest finished attempts (succeeded / failed -> retry or FAILED / preempted -> QUEUED);
  3. carry out cancel requests;
  4. snapshot -> policy.schedule -> commit each start (QUEUED -> ADMITTED, placement written)
     BEFORE asking the executor to launch it (ADMITTED -> STARTING); record pending reasons.

Every state change goes through the store's compare-and-set transition, so the API thread and
this loop never both move a job. `recover()` runs once at start-up and reconciles the store with
what is really running; `shutdown()` checkpoints running jobs and puts them back in the queue.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable, Protocol

from scheduler.clock import Clock
from scheduler.executor import Executor, LaunchRequest, Outcome, ProgressEvent
from scheduler.inventory import Inventory
from scheduler.lifecycle import ACTIVE, JobState
from scheduler.policy import (
    Cohort, Decision, JobRequest, PolicySettings, RunningJob, Snapshot, TeamQuota, schedule,
)
from scheduler.spec import ClusterConfig
from scheduler.store import Conflict, JobRecord, Store

log = logging.getLogger("shoal.service")
S = JobState


def _cpus_per_gpu(spec: dict) -> int:
    return int(spec.get("resources", {}).get("cpus_per_gpu", 1))


def _resources(spec: dict) -> dict:
    return spec.get("resources", {}) or {}


def policy_settings(config: ClusterConfig) -> PolicySettings:
    s = config.scheduler
    return PolicySettings(share_max_utilization=s.share_max_utilization, min_runtime_s=s.min_runtime_s,
                          aging_s=s.aging_s, backfill=s.backfill, preemption=s.preemption,
                          over_budget=s.over_budget)


class JobListener(Protocol):
    """Told when a job starts holding GPUs and when it lets them go (e.g. the fake GPU load)."""

    def placed(self, job: JobRecord) -> None: ...

    def released(self, job: JobRecord) -> None: ...


class Service:
    def __init__(self, store: Store, executor: Executor, inventory: Inventory, config: ClusterConfig,
                 clock: Clock, home: Path, listeners: list[JobListener] | None = None,
                 on_cycle=None, policy: Callable[[Snapshot], Decision] = schedule):
        self.store = store
        self.executor = executor
        self.inventory = inventory
        self.config = config
        self.clock = clock
        self.home = Path(home)
        self.listeners = listeners or []
        self.on_cycle = on_cycle  # called with the cycle's duration in seconds (metrics)
        self.policy = policy  # any pure Snapshot -> Decision (the simulator swaps baselines in)
        self._killing: set[tuple[int, int]] = set()
        self._stopping = False

    # -- paths --------------------------------------------------------------------------------
    def job_dir(self, job_id: int) -> Path:
        return self.home / "jobs" / str(job_id)

    def log_path(self, job_id: int) -> Path:
        return self.job_dir(job_id) / "train.log"

    def _log(self, job_id: int, *lines: str) -> None:
        path = self.log_path(job_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.writelines(line.rstrip("\n") + "\n" for line in lines)

    # -- transitions with side effects --------------------------------------------------------
    def _move(self, job: JobRecord, src, dst: JobState, reason: str, **changes) -> JobRecord | None:
        now = self.clock.now()
        if dst.terminal:
            changes.setdefault("finished_at", now)
        if job.state.active and not dst.active and job.attempt_started_at is not None:
            # GPU-seconds this attempt received (fair share, LAS); the attempt clock stops here
            held = len((job.placement or {}).get("gpu_indices", ())) or job.gpus
            changes.setdefault("attained_gpu_s", job.attained_gpu_s + held * max(0.0, now - job.attempt_started_at))
            changes.setdefault("attempt_started_at", None)
        try:
            new = self.store.transition(job.id, src, dst, reason=reason, now=now, **changes)
        except Conflict as e:
            log.info("skip: %s", e)
            return None
        self._log(job.id, f"[shoal] {job.state.value} -> {dst.value}: {reason}")
        if job.state.active and not dst.active:
            for lst in self.listeners:
                lst.released(new)
        if dst is S.STARTING:
            for lst in self.listeners:
                lst.placed(new)
        return new

    # -- the cycle ----------------------------------------------------------------------------
    def tick(self) -> None:
        t0 = self.clock.now()
        outcomes = self.executor.poll()  # first, so progress sent before the end is drained below
        self._ingest_progress(self.executor.drain_progress())
        for outcome in outcomes:
            self._ingest_outcome(outcome)
        self._carry_out_cancels()
        if not self._stopping:
            self._schedule()
        if self.on_cycle:
            self.on_cycle(self.clock.now() - t0)

    def _ingest_progress(self, events: list[ProgressEvent]) -> None:
        latest: dict[tuple[int, int], dict] = {}  # (job, attempt) -> newest value of each field
        lines: dict[int, list[str]] = {}  # job -> log lines, written once per job per cycle
        for ev in events:
            e = ev.event
            if e.get("type") == "log":
                lines.setdefault(ev.job_id, []).append(str(e.get("line", "")))
            elif e.get("type") == "step":
                lines.setdefault(ev.job_id, []).append("step {}/{} loss {:.4f} lr {:.3g} tokens/s {:.0f}".format(
                    e.get("step"), e.get("total_steps"), float(e.get("loss", float("nan"))),
                    float(e.get("lr", 0.0)), float(e.get("tokens_per_s", 0.0))))
            fields = latest.setdefault((ev.job_id, ev.attempt), {})
            fields.update({k: v for k, v in e.items() if k not in ("type", "line")})
            if e.get("type") == "checkpoint":
                fields["checkpoint_step"] = e.get("step")
        for job_id, job_lines in lines.items():
            self._log(job_id, *job_lines)
        for (job_id, attempt), fields in latest.items():
            try:
                job = self.store.get(job_id)
            except KeyError:
                continue
            if job.attempt != attempt or not job.state.active:
                continue  # a stale report from an earlier attempt
            changes = {"progress": {**(job.progress or {}), **fields}}
            if "checkpoint_step" in fields:
                changes["last_checkpoint_step"] = fields["checkpoint_step"]
                changes["last_checkpoint_at"] = self.clock.now()
            self.store.update_fields(job_id, **changes)
            if job.state is S.STARTING:  # any report means the trainer is alive
                self._move(job, S.STARTING, S.RUNNING, "training started")

    def _ingest_outcome(self, o: Outcome) -> None:
        self._killing.discard((o.job_id, o.attempt))
        try:
            job = self.store.get(o.job_id)
        except KeyError:
            return
        if job.attempt != o.attempt or not job.state.active:
            log.info("ignoring stale outcome %s", o)
            return
        src = job.state
        if o.status == "succeeded":
            out = o.metrics.get("output_dir")
            self._move(job, src, S.SUCCEEDED, f"training finished; output in {out}" if out else "training finished",
                       result=o.metrics, placement=None)
        elif job.cancel_requested:
            self._move(job, src, S.CANCELLED, "cancelled by user", placement=None)
        elif o.status == "failed":
            self._log(job.id, f"[shoal] attempt {o.attempt} failed:\n{o.error}")
            max_retries = int(job.spec.get("max_retries", 1))
            cause = (o.error or "unknown error").strip().splitlines()[-1][:500]
            if job.retries < max_retries:
                self._move(job, src, S.QUEUED, f"attempt {o.attempt} failed ({cause}); retry "
                           f"{job.retries + 1}/{max_retries} resumes from the last checkpoint",
                           retries=job.retries + 1, placement=None)
            else:
                self._move(job, src, S.FAILED, f"failed: {cause}", failure_reason=o.error, placement=None)
        else:  # preempted or killed without a cancel: back to the queue, resume from checkpoint
            step = o.metrics.get("step", job.last_checkpoint_step)
            why = "stopped at a checkpoint" if o.status == "preempted" else "killed"
            self._move(job, src, S.QUEUED, f"{why} (step {step}); resumes from the last checkpoint",
                       placement=None)

    def _carry_out_cancels(self) -> None:
        for job in self.store.jobs(states=[S.QUEUED, *ACTIVE], cancel_requested=True):
            if job.state in (S.QUEUED, S.ADMITTED):
                self._move(job, job.state, S.CANCELLED, "cancelled by user", placement=None)
            elif (job.id, job.attempt) not in self._killing:
                self._killing.add((job.id, job.attempt))
                self.executor.kill(job.id, job.attempt)

    def quotas(self) -> tuple[TeamQuota, ...]:
        """Teams from the cluster config. Decayed usage and spend are the policy issue's (#3) to fill."""
        return tuple(
            TeamQuota(name, t.gpus, nominal_by_flavor=tuple(sorted(t.gpus_by_model.items())), cohort=t.cohort,
                      borrowing_limit=t.borrowing_limit, lending_limit=t.lending_limit, weight=t.weight,
                      budget_usd=t.budget_usd)
            for name, t in sorted(self.config.teams.items())
        )

    def running_views(self, active: list[JobRecord]) -> list[RunningJob]:
        now = self.clock.now()
        views = []
        for j in active:
            if not j.placement:
                continue
            gpus = tuple(j.placement["gpu_indices"])
            started = j.attempt_started_at if j.attempt_started_at is not None else now
            res = _resources(j.spec)
            expected = res.get("expected_duration_s")
            views.append(RunningJob(
                j.id, j.team, j.priority, j.placement["node_id"], gpus, j.memory_per_gpu_mib,
                cpus=_cpus_per_gpu(j.spec) * len(gpus), submitted_at=j.submitted_at, started_at=started,
                last_checkpoint_at=j.last_checkpoint_at,
                expected_end_at=(started + float(expected)) if expected else None,
                attained_gpu_s=j.attained_gpu_s + len(gpus) * max(0.0, now - started),
                shareable=bool(res.get("shareable", False)), gpu_model=j.placement.get("gpu_model"),
                preemptible=j.state in (S.STARTING, S.RUNNING),
            ))
        return views

    def pending_views(self, queued: list[JobRecord]) -> tuple[JobRequest, ...]:
        out = []
        for j in queued:
            res = _resources(j.spec)
            expected = res.get("expected_duration_s")
            out.append(JobRequest(
                j.id, j.team, j.priority, j.submitted_at, j.gpus, j.memory_per_gpu_mib, res.get("gpu_model"),
                _cpus_per_gpu(j.spec), shareable=bool(res.get("shareable", False)),
                expected_duration_s=float(expected) if expected else None, attained_gpu_s=j.attained_gpu_s,
                user=j.user,
            ))
        return tuple(out)

    def snapshot(self) -> tuple[Snapshot, dict[int, JobRecord]]:
        running = self.running_views(self.store.active_jobs())
        queued = self.store.jobs(states=[S.QUEUED], cancel_requested=False)
        snap = Snapshot(
            self.inventory.node_views(running), tuple(running), self.pending_views(queued), self.quotas(),
            self.config.scheduler.memory_headroom_mib, now=self.clock.now(),
            cohorts=tuple(Cohort(n, c.parent) for n, c in sorted(self.config.cohorts.items())),
            settings=policy_settings(self.config),
        )
        return snap, {j.id: j for j in queued}

    def _schedule(self) -> None:
        snap, queued = self.snapshot()
        decision = self.policy(snap)
        for pre in decision.to_preempt:
            self._preempt(pre.job_id, pre.reason)
        for start in decision.to_start:
            self._start(queued[start.job_id], start.placement.node_id, start.placement.gpu_indices)
        for job_id, reason in decision.pending.items():
            if queued[job_id].pending_reason != reason:
                self.store.update_fields(job_id, pending_reason=reason)

    def _preempt(self, job_id: int, reason: str) -> None:
        """Ask a running job to checkpoint and stop; it returns to the queue when it has."""
        job = self.store.get(job_id)
        if job.state in (S.STARTING, S.RUNNING) and self._move(job, job.state, S.PREEMPTING, f"preempted: {reason}"):
            self.executor.request_stop(job.id, job.attempt)

    def _launch_request(self, job: JobRecord) -> LaunchRequest:
        d = self.job_dir(job.id)
        d.mkdir(parents=True, exist_ok=True)
        return LaunchRequest(
            job_id=job.id, attempt=job.attempt, spec=job.spec, node_id=job.placement["node_id"],
            gpu_indices=tuple(job.placement["gpu_indices"]), memory_per_gpu_mib=job.memory_per_gpu_mib,
            job_dir=str(d), output_dir=job.spec.get("output") or str(d / "output"),
            price_per_gpu_hour=getattr(self.config.gpu_models.get(job.placement.get("gpu_model") or ""),
                                       "price_per_hour", None),
        )

    def _start(self, job: JobRecord, node_id: str, gpu_indices: tuple[int, ...]) -> None:
        placement = {"node_id": node_id, "node": self.inventory.node_name(node_id), "gpu_indices": list(gpu_indices),
                     "gpu_model": self.inventory.gpu_model(node_id, gpu_indices)}
        admitted = self._move(job, S.QUEUED, S.ADMITTED,
                              f"placed on {placement['node']} GPU {','.join(map(str, gpu_indices))}",
                              placement=placement, attempt=job.attempt + 1, pending_reason=None,
                              attempt_started_at=self.clock.now(), last_checkpoint_at=None)
        if admitted is not None:
            self._launch(admitted)

    def _launch(self, job: JobRecord) -> None:
        try:
            self.executor.launch(self._launch_request(job))
        except Exception as e:  # noqa: BLE001 - a launch error must not stop the loop
            log.exception("launch of job %s failed", job.id)
            # Counted like any failed attempt, so a launch that always fails ends in FAILED.
            self._ingest_outcome(Outcome(job.id, job.attempt, "failed", error=f"launch failed: {e!r}"))
            return
        self._move(job, S.ADMITTED, S.STARTING, f"launched attempt {job.attempt}",
                   started_at=job.started_at or self.clock.now())

    # -- start-up and shut-down ---------------------------------------------------------------
    def recover(self) -> None:
        """Reconcile the store with reality after a (re)start: a committed-but-unlaunched job is
        launched (idempotent); a job the store thinks is running but the executor does not know
        goes back to the queue and resumes from its last checkpoint; live runs are adopted."""
        for job in self.store.active_jobs():
            if job.state is S.ADMITTED:
                self._launch(job)
            elif self.executor.is_active(job.id, job.attempt):
                log.info("adopting job %s attempt %s", job.id, job.attempt)
                if job.state is not S.PREEMPTING:
                    for lst in self.listeners:
                        lst.placed(job)
            else:
                self._move(job, job.state, S.QUEUED,
                           "not running after a service restart; resumes from the last checkpoint",
                           placement=None)

    def shutdown(self, grace_s: float, poll_s: float = 0.2) -> None:
        """Stop launching; ask every running job to checkpoint and stop; after `grace_s` kill
        what is left. Every job ends QUEUED (it resumes on the next start) or terminal."""
        self._stopping = True
        for job in self.store.active_jobs():
            if job.state is S.ADMITTED:
                self._move(job, S.ADMITTED, S.QUEUED, "service stopping before launch", placement=None)
            elif job.state in (S.STARTING, S.RUNNING):
                self._preempt(job.id, "service stopping; checkpoint and requeue")
        deadline = self.clock.now() + grace_s
        while self.store.active_jobs() and self.clock.now() < deadline:
            self.tick()
            self.clock.sleep(poll_s)
        self.tick()
        for job in self.store.active_jobs():
            self.executor.kill(job.id, job.attempt)
        self.tick()
        for job in self.store.active_jobs():  # the executor could not confirm: requeue anyway
            self._move(job, job.state, S.QUEUED, f"no checkpoint within {grace_s:.0f} s of stopping; "
                       "requeued", placement=None)

    def run(self, stop: threading.Event) -> None:
        interval = self.config.scheduler.interval_s
        while not stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - keep scheduling; the error is logged
                log.exception("scheduler cycle failed")
            stop.wait(interval)
