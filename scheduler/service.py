"""The control loop. One `tick()`:

  1. ingest progress the running jobs sent (first progress moves STARTING -> RUNNING);
  2. ingest finished attempts (succeeded / failed -> retry or FAILED / preempted -> QUEUED);
  3. carry out cancel requests;
  4. snapshot (`self.views`, scheduler/snapshot.py) -> policy.schedule -> commit each start
     (QUEUED -> ADMITTED, placement written) BEFORE asking the executor to launch it
     (ADMITTED -> STARTING); record pending reasons.

Every state change goes through the store's compare-and-set transition, so the API thread and
this loop never both move a job. `recover()` runs once at start-up and reconciles the store with
what is really running; `shutdown()` checkpoints running jobs and puts them back in the queue.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable, Protocol

from scheduler import placement as pl
from scheduler.accounting import charge_fraction
from scheduler.admission import storage_root
from scheduler.clock import Clock
from scheduler.executor import Executor, LaunchRequest, Outcome, ProgressEvent
from scheduler.inventory import Inventory
from scheduler.lifecycle import ACTIVE, JobState
from scheduler.nodes import Nodes
from scheduler.policy import Decision, Placement, Snapshot, forecast, schedule
from scheduler.snapshot import StoreViews, resources
from scheduler.spec import ClusterConfig
from scheduler.store import Conflict, Fenced, JobRecord, Store

log = logging.getLogger("shoal.service")
S = JobState


class JobListener(Protocol):
    """Told when a job starts holding GPUs and when it lets them go (e.g. the fake GPU load)."""

    def placed(self, job: JobRecord) -> None: ...

    def released(self, job: JobRecord) -> None: ...


class Service:
    def __init__(self, store: Store, executor: Executor, inventory: Inventory, config: ClusterConfig,
                 clock: Clock, home: Path, listeners: list[JobListener] | None = None,
                 on_cycle=None, policy: Callable[[Snapshot], Decision] = schedule,
                 preflight: Callable[[JobRecord], str | None] | None = None, job_logs: bool = True):
        self.store = store
        self.executor = executor
        self.nodes = Nodes(store, inventory, clock)  # lost, drained, faulty nodes
        self.inventory = inventory
        self.config = config
        self.clock = clock
        self.views = StoreViews(store, self.nodes, config, clock)  # the store as the policy sees it
        self.home = Path(home)
        self.listeners = listeners or []
        self.on_cycle = on_cycle  # called with the cycle's duration in seconds (metrics)
        self.policy = policy  # any pure Snapshot -> Decision (the simulator swaps baselines in)
        # Snapshot -> estimated starts of the waiting jobs (the Shoal policy's forecast; None: only
        # the cycle's own reservation has one)
        self.forecaster: Callable[[Snapshot], dict[int, float]] | None = forecast if policy is schedule else None
        self._forecast: dict[int, float] = {}
        self._forecast_at = float("-inf")
        self.preflight = preflight  # job -> why it can never launch (None: fine); see check_launchable
        self.job_logs = job_logs  # per-job train.log lines; the simulator turns them off (speed)
        self._killing: set[tuple[int, int]] = set()
        self._stopping = False
        self._backlog: list[Outcome] = []  # outcomes polled but not yet recorded (store errors)
        self._reconcile = False  # a cycle failed half-way: reconcile store and executor first
        self._scanned_at = float("-inf")  # last full scan for rows with an unknown state
        self.max_loop_share = 0.25  # run(): after a cycle of d seconds, wait >= d * (1/share - 1)

    @property
    def inventory(self) -> Inventory:
        return self._inventory

    @inventory.setter
    def inventory(self, inventory: Inventory) -> None:
        """A new inventory (tests swap one in) is the node bookkeeping's too."""
        self._inventory = self.nodes.inventory = inventory

    # -- paths --------------------------------------------------------------------------------
    def job_dir(self, job_id: int) -> Path:
        return self.home / "jobs" / str(job_id)

    def log_path(self, job_id: int) -> Path:
        return self.job_dir(job_id) / "train.log"

    def _log(self, job_id: int, *lines: str) -> None:
        if not self.job_logs:
            return
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
            held = pl.gpu_count(job.placement) or job.gpus
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
        for lst in self.listeners:  # optional hook: every state change (metrics count them)
            if hasattr(lst, "moved"):
                lst.moved(job, new, reason)
        return new

    # -- the cycle ----------------------------------------------------------------------------
    def tick(self) -> None:
        t0 = self.clock.now()
        # first, so progress sent before the end is drained below; kept until recorded
        self._backlog.extend(self.executor.poll())
        try:
            self._ingest_progress(self.executor.drain_progress())
            while self._backlog:
                self._ingest_outcome(self._backlog[0])
                self._backlog.pop(0)
            scan = self.clock.now() - self._scanned_at >= 10.0  # a full-table scan: every 10 s
            if scan:
                self._scanned_at = self.clock.now()
            for job_id, problem in self.store.quarantine_corrupt(self.clock.now(), scan=scan):
                log.error("job %s failed for good: corrupted row: %s", job_id, problem)
            if self._reconcile:  # the last cycle failed half-way (e.g. the database was unreachable)
                self.recover()
                self._reconcile = False
            self._sync_nodes()
            self._carry_out_cancels()
            if not self._stopping:
                self._schedule()
        except Fenced:
            raise
        except Exception:
            self._reconcile = True
            raise
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
            if self._lost_with_its_node(job, src):
                return
            if "[Errno 28]" in (o.error or "") or "No space left on device" in (o.error or ""):
                # A full disk fails the next attempt too: fail now, say what to do.
                self._move(job, src, S.FAILED, f"failed: disk full (ENOSPC) while writing checkpoints or the output "
                           f"({cause}); free space, then resubmit", failure_reason=o.error, placement=None)
            elif job.retries < max_retries:
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

    def _lost_with_its_node(self, job: JobRecord, src: JobState) -> bool:
        """A failed attempt whose node is gone (the node died and took the job with it, often
        before the cluster declares the node dead) is the infrastructure's failure, not the
        job's: the node is marked lost and the job requeued without spending a retry. A gang
        spanning nodes is requeued whole when ANY of its nodes is gone (its other workers fail
        with the lost ones: one DDP world)."""
        down = [(node_id, name) for node_id, name, _ in pl.named_parts(job.placement)
                if self.inventory.node_down(node_id)]
        if not down:
            return False
        stored = self.store.nodes()
        for node_id, name in down:
            node = stored.get(node_id)
            if node is not None and not node.lost:
                log.warning("node %s lost (job %s's attempt %s failed with it)", name, job.id, job.attempt)
                self.store.mark_node_lost(node_id, self.clock.now())
        self._move(job, src, S.QUEUED, self._lost_reason(", ".join(name for _, name in down)), placement=None)
        return True

    @staticmethod
    def _lost_reason(node_name: str) -> str:
        return f"node {node_name} lost; resumes from the last checkpoint on another node"

    def _carry_out_cancels(self) -> None:
        for job in self.store.jobs(states=[S.QUEUED, *ACTIVE], cancel_requested=True):
            if job.state in (S.QUEUED, S.ADMITTED):
                self._move(job, job.state, S.CANCELLED, "cancelled by user", placement=None)
            elif (job.id, job.attempt) not in self._killing:
                self._killing.add((job.id, job.attempt))
                self.executor.kill(job.id, job.attempt)

    def _schedule(self) -> None:
        waiting = self.views.queued_jobs()
        if not waiting:
            return  # nothing waits: no decision to make (policies start or preempt only for waiting jobs)
        snap, queued = self.views.snapshot(waiting)
        decision = self.policy(snap)
        for pre in decision.to_preempt:
            self._preempt(pre.job_id, pre.reason)
        for start in decision.to_start:
            self._start(queued[start.job_id], start.placement)
        etas = self._estimates(snap, decision)
        changed = {job_id: {"pending_reason": reason, "estimated_start_at": etas.get(job_id)}
                   for job_id, reason in decision.pending.items()
                   if (j := queued[job_id]).pending_reason != reason or j.estimated_start_at != etas.get(job_id)}
        if changed:  # one transaction for the cycle's reasons (a write per job cost more than the plan)
            self.store.update_many(changed)
            self.views.reasons_written(queued, changed)

    def _estimates(self, snap: Snapshot, decision: Decision) -> dict[int, float]:
        """Estimated starts to store: the cycle's own (its reservation) plus the policy's forecast
        for the rest of the queue (`squeue --start`), recomputed every `forecast_interval_s` (it
        costs more than a cycle) and kept in between for jobs that still wait."""
        every = self.config.scheduler.forecast_interval_s
        if self.forecaster is None or every <= 0:
            return decision.estimated_start
        now = self.clock.now()
        if now - self._forecast_at >= every:
            self._forecast, self._forecast_at = self.forecaster(snap), now
        return {**{k: v for k, v in self._forecast.items() if k in decision.pending}, **decision.estimated_start}

    def _preempt(self, job_id: int, reason: str) -> None:
        """Ask a running job to checkpoint and stop; it returns to the queue when it has."""
        job = self.store.get(job_id)
        if job.state in (S.STARTING, S.RUNNING) and self._move(job, job.state, S.PREEMPTING, f"preempted: {reason}"):
            self.executor.request_stop(job.id, job.attempt)

    def requeue(self, job_id: int, reason: str) -> None:
        """A user's requeue (API): checkpoint, stop, back to the queue; resumes from the checkpoint."""
        self._preempt(job_id, reason)

    def _launch_request(self, job: JobRecord) -> LaunchRequest:
        d = self.job_dir(job.id)
        out = job.spec.get("output")
        if self.job_logs:
            d.mkdir(parents=True, exist_ok=True)
        parts = pl.parts(job.placement)
        return LaunchRequest(
            job_id=job.id, attempt=job.attempt, spec=job.spec, node_id=job.placement["node_id"],
            gpu_indices=tuple(job.placement["gpu_indices"]), memory_per_gpu_mib=job.memory_per_gpu_mib,
            # a chosen output folder gets a per-job subfolder (two jobs never write into one
            # folder); the default is the job's own folder
            job_dir=str(d), output_dir=f"{out}/job-{job.id}" if out else str(d / "output"),
            storage_root=str(storage_root()) if out else None,
            price_per_gpu_hour=getattr(self.config.gpu_models.get(job.placement.get("gpu_model") or ""),
                                       "price_per_hour", None),
            parts=tuple(parts) if len(parts) > 1 else (),
        )

    def _start(self, job: JobRecord, where: Placement) -> None:
        """Commit the placement (every node of a gang) and launch. The flavor, GPU memory and
        price come from the first part: a gang never mixes GPU models."""
        flavor, gpu_mib = self.inventory.gpu_info(where.node_id, where.gpu_indices)
        named = [(n, self.inventory.node_name(n), tuple(ix)) for n, ix in where.all_parts()]
        placement = pl.record(named, flavor)
        model = self.config.gpu_models.get(flavor or "")
        # the usage ledger has one row per attempt: a gang's row names all its nodes ("a+b")
        usage = {"gpu_model": flavor, "node": "+".join(name for _, name, _ in named),
                 "gpus": sum(len(ix) for _, _, ix in named),
                 "gpu_fraction": charge_fraction(bool(resources(job.spec).get("shareable", False)),
                                                 job.memory_per_gpu_mib, gpu_mib),
                 "price_per_gpu_hour": model.price_per_hour if model else 0.0}
        admitted = self._move(job, S.QUEUED, S.ADMITTED, f"placed on {pl.describe(placement)}",
                              placement=placement, attempt=job.attempt + 1, pending_reason=None,
                              estimated_start_at=None,
                              attempt_started_at=self.clock.now(), last_checkpoint_at=None, usage=usage)
        if admitted is not None:
            self._launch(admitted)

    def _launch(self, job: JobRecord) -> None:
        problem = self.preflight(job) if self.preflight else None
        if problem:  # can never run (bad stored spec, inputs gone): fail for good, keep going
            self._move(job, S.ADMITTED, S.FAILED, f"cannot launch: {problem}", failure_reason=problem, placement=None)
            return
        try:
            self.executor.launch(self._launch_request(job))
        except Exception as e:  # noqa: BLE001 - a launch error must not stop the loop
            log.exception("launch of job %s failed", job.id)
            # Counted like any failed attempt, so a launch that always fails ends in FAILED.
            self._ingest_outcome(Outcome(job.id, job.attempt, "failed", error=f"launch failed: {e!r}"))
            return
        self._move(job, S.ADMITTED, S.STARTING, f"launched attempt {job.attempt}",
                   started_at=job.started_at or self.clock.now())

    # -- jobs on lost and drained nodes (the nodes themselves: scheduler/nodes.py) --------------
    def _sync_nodes(self) -> None:
        """A lost node's jobs go back to the queue (not counted as a failure: they resume from
        their last checkpoint elsewhere); a drained node's running jobs checkpoint and move. A
        gang moves whole when any of its nodes does."""
        stored = self.nodes.sync()
        if stored is None:
            return
        for job in self.store.active_jobs():
            nodes = [n for n in (stored.get(i) for i in pl.node_ids(job.placement)) if n is not None]
            lost = [n for n in nodes if n.lost]
            drained = [n for n in nodes if n.drained]
            if lost:
                self.executor.kill(job.id, job.attempt)
                self._move(job, job.state, S.QUEUED, self._lost_reason(", ".join(n.name for n in lost)),
                           placement=None)
            elif drained and job.state in (S.STARTING, S.RUNNING):
                node = drained[0]
                self._preempt(job.id, f"node {node.name} drained ({node.drain_reason}); checkpoint and move")

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
                if job.state is S.PREEMPTING:  # the stop may not have been sent before a crash
                    self.executor.request_stop(job.id, job.attempt)
                else:
                    for lst in self.listeners:
                        lst.placed(job)
            else:
                self._move(job, job.state, S.QUEUED,
                           "not running after a service restart; resumes from the last checkpoint",
                           placement=None)
        reap = getattr(self.executor, "reap", None)  # runners left by a crash after their outcome was recorded
        if reap is not None:
            for name in reap({(j.id, j.attempt) for j in self.store.active_jobs()}):
                log.warning("ended runner %s: its attempt is over (left by a crash before it was ended)", name)

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
        """Cycles until `stop`; a failed cycle (database briefly unreachable, a Ray hiccup) is
        logged and the next one reconciles first. Returns on `Fenced`: another replica leads."""
        interval = self.config.scheduler.interval_s
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                self.tick()
            except Fenced as e:
                log.error("lost the leadership, stopping the control loop: %s", e)
                return
            except Exception:  # noqa: BLE001 - keep scheduling; the error is logged
                log.exception("scheduler cycle failed")
            # A long queue makes a cycle long; the loop then waits longer too, so it takes at most
            # `max_loop_share` of the process's time (the API shares the interpreter's lock).
            spent = time.perf_counter() - t0
            stop.wait(max(interval, spent * (1 / self.max_loop_share - 1)))


def check_launchable(job: JobRecord) -> str | None:
    """Why a job's stored spec can never launch, or None: a spec written by a newer Shoal, a spec
    that no longer validates (a corrupted or hand-edited row), a model or dataset that disappeared
    after submit. (The daemon's preflight; the in-memory tests use specs that are not JobSpecs.)"""
    from pydantic import ValidationError

    from scheduler.spec import JobSpec, format_validation_error

    version = job.spec.get("api_version", "shoal/v1")
    if version != "shoal/v1":
        return (f"api_version: the spec is {version!r}, newer than this Shoal (it reads 'shoal/v1'); run it with "
                "a Shoal that knows that version")
    try:
        spec = JobSpec.model_validate(job.spec)
    except ValidationError as e:
        return "stored spec no longer validates (corrupted row?): " + "; ".join(format_validation_error(e, ""))
    for field, path in spec.path_fields().items():
        if field != "output" and path and not Path(path).exists():
            return f"{field}: {path} no longer exists (it did at submit); restore it or resubmit"
    return None
