"""What the policy sees of the store: one `Snapshot` per cycle.

`StoreViews` turns the store's rows into the policy's immutable inputs - a `JobRequest` per queued
job, a `RunningJob` per placed one, the node views with the node bookkeeping's overlay, the team
quotas with their fair-share usage and spend - and keeps what makes that cheap on a long queue:
views cached per attempt (the policy memoizes per-job facts on the view objects, so one object
serves every cycle of an attempt), the queue read by row versions, the records the API's batcher
hands over, and the usage ledger refreshed every `usage_refresh_s`. The control loop
(`scheduler.service.Service`) owns one and calls `snapshot()` each cycle; the API reads the same
views (estimates, node pages) through `service.views`.
"""
from __future__ import annotations

import operator
import threading
from bisect import bisect_left, insort

from scheduler import placement as pl
from scheduler.accounting import TeamUsage
from scheduler.clock import Clock
from scheduler.copying import with_fields
from scheduler.lifecycle import ACTIVE, JobState
from scheduler.nodes import Nodes
from scheduler.policy import Cohort, JobRequest, PolicySettings, RunningJob, Snapshot, TeamQuota
from scheduler.spec import ClusterConfig
from scheduler.store import JobRecord, Store

S = JobState
_PREEMPTIBLE = (S.STARTING, S.RUNNING)  # a running view's `preemptible`
_ID, _SECOND, _THIRD = operator.attrgetter("id"), operator.itemgetter(1), operator.itemgetter(2)


def resources(spec: dict) -> dict:
    return spec.get("resources", {}) or {}


def _cpus_per_gpu(spec: dict) -> int:
    return int(resources(spec).get("cpus_per_gpu", 1))


def remaining_s(spec: dict, gpus: int, attained_gpu_s: float) -> float | None:
    """Expected remaining run time: the spec's `resources.expected_duration_s` (total run time on
    its GPUs) minus the work finished attempts already did (their GPU-seconds over the job's GPU
    count). A job that has already run longer than its estimate is expected to need
    OVERRUN_FRACTION of what it ran so far (job run times are heavy-tailed: the longer one has
    run past its estimate, the longer it is likely to go on), not zero, which would make it look
    about to end (reservations on its GPUs) and shortest of all. None when the spec gives no
    estimate."""
    expected = resources(spec).get("expected_duration_s")
    if not expected:
        return None
    done = attained_gpu_s / max(1, gpus)
    left = float(expected) - done
    return left if left > 0 else OVERRUN_FRACTION * done


OVERRUN_FRACTION = 0.25


def policy_settings(config: ClusterConfig) -> PolicySettings:
    s = config.scheduler
    return PolicySettings(share_max_utilization=s.share_max_utilization, min_runtime_s=s.min_runtime_s,
                          preempt_backoff=s.preempt_backoff,
                          aging_s=s.aging_s, backfill=s.backfill, preemption=s.preemption,
                          over_budget=s.over_budget, fair_share_band=s.fair_share_band,
                          fair_share_history_weight=s.fair_share_history_weight,
                          max_preemptions_per_cycle=s.max_preemptions_per_cycle, aging_ratio=s.aging_ratio,
                          las_preempt_factor=s.las_preempt_factor, makespan_guard=s.makespan_guard,
                          defrag_factor=s.defrag_factor,
                          preempt_grace_s=s.preempt_grace_s, share_max_duration_s=s.share_max_duration_s,
                          share_max_jobs=s.share_max_jobs,
                          multi_node=s.multi_node)


class StoreViews:
    """The policy's view of one store, kept by one control loop. API threads read through it too
    (admission checks, dry runs, node pages, the cost metrics): each view cache is replaced by a
    new dict in one assignment, so a concurrent call at worst computes a view again, and the usage
    ledger refreshes under a lock (team_usage)."""

    def __init__(self, store: Store, nodes: Nodes, config: ClusterConfig, clock: Clock):
        self.store = store
        self.nodes = nodes  # node bookkeeping; its `inventory` is the service's current one
        self.config = config
        self.clock = clock
        self.usage_refresh_s = 10.0
        # the ledger's full recount, for other writers' late records (accounting.TeamUsage); a
        # simulation, the store's only writer on one clock, turns it off (math.inf)
        self.usage_full_every_s = 86_400.0
        self._usage_cache: tuple[float, tuple[dict[str, float], dict[str, float]]] | None = None
        self._team_usage: TeamUsage | None = None
        self._usage_lock = threading.Lock()  # TeamUsage.refresh is not re-entrant (team_usage)
        self._running_cache: dict = {}  # job id -> view fields (running_views)
        # _advance: the store's change log read up to here; job id -> (key, view, record) of each
        # placed active job and job id -> (key, request, record) of each queued one, their ids in
        # order, and what the loop reads of them in that order
        self._live_lock = threading.Lock()
        self._live_pos = 0
        self._live_run: dict[int, tuple[tuple, RunningJob, JobRecord]] = {}
        self._live_run_ids: list[int] = []
        self._live_views: tuple[RunningJob, ...] = ()
        self._live_queue: dict[int, tuple[tuple, JobRequest, JobRecord]] = {}
        self._live_queue_ids: list[int] = []
        # (records, requests): one pair, replaced in one assignment (snapshot() reads it unlocked)
        self._live_queued: tuple[list[JobRecord], tuple[JobRequest, ...]] = ([], ())
        self._pending_cache: dict = {}  # job id -> JobRequest (pending_views)
        self._queued_cache: dict = {}  # job id -> (version, JobRecord) of the last cycle's queue
        self._handed: dict[int, JobRecord] = {}  # jobs this process just created (note_submitted)

    def team_usage(self) -> tuple[dict[str, float], dict[str, float]]:
        """(decayed GPU-seconds, $ spent this budget period) per team, from the usage ledger
        (kept incrementally by accounting.TeamUsage). Refreshed at most every `usage_refresh_s`
        of clock time: fair share and budgets move slowly. The loop, API requests and the
        metrics scrape all ask, from their own threads; one refresh runs at a time (two at once
        would both add an attempt that just closed, and the ledger's incremental sums would count
        it twice until their next full recount, a day later)."""
        now = self.clock.now()
        if self._usage_cache is not None and now - self._usage_cache[0] < self.usage_refresh_s:
            return self._usage_cache[1]
        with self._usage_lock:
            sched = self.config.scheduler
            if self._team_usage is None or (self._team_usage.half_life_s, self._team_usage.period,
                                            self._team_usage.full_every_s) != (
                    sched.fair_share_half_life_s, sched.budget_period, self.usage_full_every_s):
                self._team_usage = TeamUsage(lambda since, opened: self.store.usage(since=since, opened_since=opened),
                                             sched.fair_share_half_life_s, sched.budget_period,
                                             self.usage_full_every_s)
            result = self._team_usage.refresh(now)
            self._usage_cache = (now, result)
        return result

    def quotas(self) -> tuple[TeamQuota, ...]:
        usage, spent = self.team_usage()
        teams = self.store.team_configs(self.config)  # the config's teams with admins' API edits applied
        return tuple(
            TeamQuota(name, t.gpus, nominal_by_flavor=tuple(sorted(t.gpus_by_model.items())), cohort=t.cohort,
                      borrowing_limit=t.borrowing_limit, lending_limit=t.lending_limit, weight=t.weight,
                      usage_gpu_s=usage.get(name, 0.0), budget_usd=t.budget_usd, spent_usd=spent.get(name, 0.0))
            for name, t in sorted(teams.items())
        )

    def running_views(self, active: list[JobRecord]) -> list[RunningJob]:
        """One view per placed job, computed once per attempt state (cached by job id): the view
        carries the attempt's start as `attained_at`, so the GPU-seconds it keeps receiving are
        read as `view.attained(now)` and one view object serves every cycle of the attempt (the
        policy memoizes per-job facts on it)."""
        now = self.clock.now()
        views = []
        cache: dict[int, tuple[tuple, RunningJob, JobRecord]] = {}
        old = self._running_cache
        for j in active:
            if not j.placement:
                continue
            hit = old.get(j.id)
            if hit is None or hit[2] is not j:  # the same (immutable) record: the same view
                hit = self._view_hit(j, hit, now)
            cache[j.id] = hit
            views.append(hit[1])
        self._running_cache = cache
        return views

    def _view_hit(self, j: JobRecord, hit: tuple | None, now: float) -> tuple[tuple, RunningJob, JobRecord]:
        """(key, view, record) for a placed job's record, reusing `hit` (its job's last entry) as
        far as the record allows."""
        # (what the view reads of the record but the checkpoint - the state only as the view reads
        # it, so STARTING -> RUNNING keeps the view object -, the last checkpoint)
        key = ((j.attempt, j.state in _PREEMPTIBLE, j.state is S.PREEMPTING, j.attempt_started_at,
                j.attained_gpu_s), j.last_checkpoint_at)
        if hit is not None and hit[0] == key:
            return key, hit[1], j
        if hit is not None and hit[0][0] == key[0] and j.attempt_started_at is not None:
            # a checkpoint (a running job's most frequent change): the view with it, the one field
            # that moved (a started attempt's view does not read the clock)
            return key, with_fields(hit[1], last_checkpoint_at=j.last_checkpoint_at), j
        return key, self._running_view(j, now), j

    # -- the control loop's views, kept by the store's change log ---------------------------
    def _advance(self) -> bool:
        """Where the store keeps a change log (Store.changes_since): read the records written since
        the last call into the loop's live caches - the placed active jobs' views, the queue and
        its requests - so a cycle costs O(changes), not O(running + waiting jobs). False where the
        store keeps no log (the callers read everything, as before). Call under `_live_lock`."""
        got = self.store.changes_since(self._live_pos)
        if got is None:
            return False
        self._live_pos, ids = got
        if not ids:
            return True
        now = self.clock.now()
        run, run_ids, queue, queue_ids = self._live_run, self._live_run_ids, self._live_queue, self._live_queue_ids
        ran = waited = False
        for j in self.store.jobs_by_id(ids):
            i = j.id
            hit = run.get(i)
            if j.state in ACTIVE and j.placement:
                if hit is None:
                    insort(run_ids, i)
                if hit is None or hit[2] is not j:
                    run[i], ran = self._view_hit(j, hit, now), True
            elif hit is not None:
                del run[i], run_ids[bisect_left(run_ids, i)]
                ran = True
            req = queue.get(i)
            if j.state is S.QUEUED and not j.cancel_requested:
                if req is None:
                    insort(queue_ids, i)
                if req is None or req[2] is not j:
                    queue[i], waited = self._request_hit(j, req), True
            elif req is not None:
                del queue[i], queue_ids[bisect_left(queue_ids, i)]
                waited = True
        if ran:  # (maps of C functions: no Python frame per job)
            self._live_views = tuple(map(_SECOND, map(run.__getitem__, run_ids)))
        if waited:
            entries = list(map(queue.__getitem__, queue_ids))
            self._live_queued = (list(map(_THIRD, entries)), tuple(map(_SECOND, entries)))
        return True

    def live_running_views(self) -> tuple[RunningJob, ...]:
        """`running_views(store.active_jobs())` for the control loop: the same views in the same
        (id) order, kept by the change log where the store has one. Its own cache: the API's calls
        of running_views replace theirs and never touch this one."""
        with self._live_lock:
            if self._advance():
                return self._live_views
        return tuple(self.running_views(self.store.active_jobs()))

    def _running_view(self, j: JobRecord, now: float) -> RunningJob:
        parts = pl.parts(j.placement)  # a multi-node gang: every node; RunningJob.parts lists them
        gpus = tuple(j.placement["gpu_indices"])  # the first node's
        total = sum(len(ix) for _, ix in parts)
        started = j.attempt_started_at if j.attempt_started_at is not None else now
        res = resources(j.spec)
        remaining = remaining_s(j.spec, total or j.gpus, j.attained_gpu_s)  # at this attempt's start
        return RunningJob(
            j.id, j.team, j.priority, j.placement["node_id"], gpus, j.memory_per_gpu_mib,
            cpus=_cpus_per_gpu(j.spec) * total, submitted_at=j.submitted_at, started_at=started,
            last_checkpoint_at=j.last_checkpoint_at,
            expected_end_at=(started + remaining) if remaining is not None else None,
            attained_gpu_s=j.attained_gpu_s,
            shareable=bool(res.get("shareable", False)), gpu_model=j.placement.get("gpu_model"),
            preemptible=j.state in _PREEMPTIBLE, stopping=j.state is S.PREEMPTING,
            restarts=max(0, j.attempt - 1 - j.retries),
            parts=tuple(parts) if len(parts) > 1 else (),
            attained_at=started,
        )

    def pending_views(self, queued: list[JobRecord]) -> tuple[JobRequest, ...]:
        """One request per queued job, cached by job id while its attempt and attained service
        (the only fields of a queued job that change) stay the same."""
        old = self._pending_cache
        cache = {j.id: self._request_hit(j, old.get(j.id)) for j in queued}
        self._pending_cache = cache
        return tuple(cache[j.id][1] for j in queued)

    def _request_hit(self, j: JobRecord, hit: tuple | None) -> tuple[tuple, JobRequest, JobRecord]:
        """(key, request, record) for a queued job's record: `hit`'s request (its job's last entry)
        while the attempt and attained service stay the same."""
        if hit is not None:
            if hit[2] is j:
                return hit
            if hit[0] == (j.attempt, j.attained_gpu_s):
                return hit[0], hit[1], j
        return self._pending_view(j)

    @staticmethod
    def _pending_view(j: JobRecord) -> tuple[tuple, JobRequest, JobRecord]:
        res = resources(j.spec)
        remaining = remaining_s(j.spec, j.gpus, j.attained_gpu_s)
        return (j.attempt, j.attained_gpu_s), JobRequest(
            j.id, j.team, j.priority, j.submitted_at, j.gpus, j.memory_per_gpu_mib, res.get("gpu_model"),
            _cpus_per_gpu(j.spec), shareable=bool(res.get("shareable", False)),
            expected_duration_s=remaining, attained_gpu_s=j.attained_gpu_s,
            user=j.user,
        ), j

    def snapshot(self, queued: list[JobRecord] | None = None) -> tuple[Snapshot, dict[int, JobRecord]]:
        running = self.live_running_views()
        live_records, live_requests = self._live_queued
        if queued is None:
            queued = self.store.jobs(states=[S.QUEUED], cancel_requested=False)
        snap = Snapshot(
            self.nodes.overlay(self.nodes.inventory.node_views(running)), running,
            live_requests if queued is live_records else self.pending_views(queued),
            self.quotas(),
            self.config.scheduler.memory_headroom_mib, now=self.clock.now(),
            cohorts=tuple(Cohort(n, c.parent) for n, c in sorted(self.store.cohort_configs(self.config).items())),
            settings=policy_settings(self.config),
        )
        return snap, dict(zip(map(_ID, queued), queued))

    def note_submitted(self, jobs: list[JobRecord]) -> None:
        """The API's batcher hands over the records it just committed, so the next cycle need not
        read those rows back. Only a hint: a record is used only while its version equals the
        row's (Store.queued_versions), otherwise the row is read as usual. Called from the
        batcher's thread; single dict stores are atomic under the interpreter lock."""
        for j in jobs:
            self._handed[j.id] = j

    def queued_jobs(self) -> list[JobRecord]:
        """QUEUED jobs not being cancelled, in id order. Where the store keeps a change log, the
        live queue (_advance; snapshot() then takes its requests as they are). Otherwise a row is
        read in full (JSON parsed) only when it is new or one of the columns that change while a
        job waits differs from the last cycle's (Store.queued_versions); a long queue is no longer
        re-read every cycle, and a job this process's API just created is taken as the API handed
        it over (note_submitted)."""
        with self._live_lock:
            if self._advance():
                self._handed.clear()  # the log has them
                return self._live_queued[0]
        versions = self.store.queued_versions()
        cache = self._queued_cache
        if self._handed:
            handed, top = self._handed, max(versions, default=-1)
            for i in list(handed):
                j = handed[i]
                v = versions.get(i)
                if v is not None:
                    if i not in cache and v == _queued_version(j):
                        cache[i] = (v, j)
                    del handed[i]
                elif i < top:  # committed before a row we see, and not queued: it left the queue
                    del handed[i]
        stale = [i for i, v in versions.items() if (hit := cache.get(i)) is None or hit[0] != v]
        fresh = {j.id: j for j in self.store.jobs_by_id(stale)} if stale else {}
        new = {i: (_queued_version(j), j) for i, j in fresh.items()
               if j.state is S.QUEUED and not j.cancel_requested}  # else it moved since the versions were read
        kept = {i: hit for i in versions if (hit := (new.get(i) if i in fresh else cache.get(i))) is not None}
        self._queued_cache = kept
        return [hit[1] for hit in kept.values()]

    def reasons_written(self, queued: dict[int, JobRecord], changed: dict[int, dict]) -> None:
        """The cycle wrote these pending reasons and estimated starts (Store.update_many): the
        cached queue records take them too, so the next cycle need not read those rows back."""
        for job_id, ch in changed.items():
            if job_id in self._queued_cache:
                j = with_fields(queued[job_id], **ch)
                self._queued_cache[job_id] = (_queued_version(j), j)


def _queued_version(j: JobRecord) -> tuple:
    """The columns Store.queued_versions reads, in its order."""
    return (j.updated_at, j.attempt, j.retries, j.attained_gpu_s, j.pending_reason, j.estimated_start_at)
