"""Jobs, the queue and the metrics summary: `/v1/jobs...`, `/v1/queue`, `/v1/metrics/summary`."""

import asyncio
import os
import time
from dataclasses import asdict, replace
from typing import Annotated, Any

from fastapi import FastAPI, Header, Query
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from scheduler.admission import Cold, SubmitError, check_submission
from scheduler.api import _PROBE_ID, JobId, Problem, SubmitBatcher, _Cached, _digest, _job_json
from scheduler.auth import Principal
from scheduler.lifecycle import ACTIVE, JobState
from scheduler.models import (
    DryRunOut, EventOut, JobOut, JobPage, LogChunk, MetricsSummary, QueueEntry, SubmitIn, TeamOut,
)
from scheduler.policy import JobRequest
from scheduler.service import Service
from scheduler.spec import ClusterConfig, JobSpec, TeamConfig, format_validation_error
from scheduler.store import Conflict, IdempotencyMismatch


def register(app: FastAPI, service: Service, Who, visible_job, own_team):
    """Adds the routes to `app`; returns (teams_now, team_out, live_jobs) for the tenancy routes."""
    store, clock = service.store, service.clock

    # -- jobs ------------------------------------------------------------------------------------
    teams_now = _Cached(lambda: store.team_configs(service.config), 1.0)

    def admission_context() -> tuple[ClusterConfig, Any, Any]:
        """What admission checks a spec against (teams, nodes, quotas), refreshed once a second:
        they change at human speed, and reading them per submit would cost more than the submit."""
        snap_nodes = service.inventory.node_views(service.views.running_views(store.active_jobs()))
        cfg = service.config.model_copy(update={"teams": teams_now.get(),
                                                "cohorts": store.cohort_configs(service.config)})
        return cfg, snap_nodes, service.views.quotas()

    admission_now = _Cached(admission_context, 1.0)

    def validate_spec(body: SubmitIn, p: Principal) -> JobSpec:
        try:
            spec = JobSpec.model_validate(body.spec)
        except ValidationError as e:
            raise Problem(422, "Invalid job spec", errors=format_validation_error(e, body.source or "")) from None
        relative = [f"{f}: {v!r} must be an absolute path (the CLI resolves paths against the spec file)"
                    for f, v in spec.path_fields().items() if v is not None and not os.path.isabs(v)]
        if relative:
            raise Problem(422, "Invalid job spec", errors=relative)
        own_team(p, spec.team, "submit")
        if not p.is_admin:  # jobs run as their submitter; only admins submit for someone else
            if spec.user not in (None, p.user):
                raise Problem(403, "Forbidden", f"user: you are {p.user!r}; only admins submit as another user")
            spec = spec.model_copy(update={"user": p.user})
        return spec if spec.user else spec.model_copy(update={"user": p.user})

    def admit(spec: JobSpec, warm_only: bool = False):
        cfg, nodes, quotas = admission_now.get()
        return check_submission(spec, cfg, nodes, quotas, warm_only=warm_only)

    async def admit_async(spec: JobSpec):
        """On the event loop when every file is in admission's caches (stats and look-ups only,
        tens of microseconds); a spec whose dataset, tokenizer or model config must be parsed,
        and the admission context's refresh (store reads), go to a worker thread."""
        if admission_now.fresh():
            try:
                return admit(spec, warm_only=True)
            except Cold:
                pass
        return await run_in_threadpool(admit, spec)

    batcher = SubmitBatcher(store, on_created=service.views.note_submitted)

    @app.post("/v1/jobs", status_code=201, response_model=JobOut,
              responses={200: {"model": JobOut, "description": "an idempotent replay: the job the same key "
                                                                "created before"}})
    async def submit(body: SubmitIn, p: Who,
                     idempotency_key: Annotated[str | None, Header(max_length=255, min_length=1)] = None) -> Response:
        """Queue a job. With `Idempotency-Key`, a retry with the same key and body returns the
        job created the first time (200) instead of a second job; the same key with another body
        is refused (422)."""
        # async: validation is CPU work either way; running it on the event loop saves the
        # thread-pool hop and the lock convoy of dozens of threads (the commit is awaited).
        spec = validate_spec(body, p)
        try:
            adm = await admit_async(spec)
        except SubmitError as e:
            raise Problem(422, "Job cannot be submitted", errors=e.problems) from None
        kw = dict(spec=spec.model_dump(mode="json"), name=spec.name, team=spec.team, user=spec.user,
                  priority=spec.priority, gpus=adm.gpus, memory_per_gpu_mib=adm.memory_per_gpu_mib,
                  now=clock.now(), reason=f"submitted by {p.user}: {adm.gpus} GPU(s), "
                  f"~{adm.memory_per_gpu_mib} MiB each; {adm.train_records} training records")
        if idempotency_key is not None:
            kw["idem"] = (p.user, idempotency_key, _digest({"spec": body.spec, "source": body.source}))
        res = await batcher.submit_async(kw)
        if isinstance(res, IdempotencyMismatch):
            raise Problem(422, "Idempotency-Key reused", str(res))
        job, created = res
        # Serialized here (the record is the store's, already valid): FastAPI would validate the
        # returned model again, in another thread-pool hop, before serializing it.
        return Response(_job_json(job), status_code=201 if created else 200, media_type="application/json")

    @app.post("/v1/jobs/dry-run")
    def dry_run(body: SubmitIn, p: Who) -> DryRunOut:
        """Everything a submit would check and what the scheduler would do with the job now
        (start it, or why it would wait and the estimated start), without queuing it."""
        try:
            spec = validate_spec(body, p)
        except Problem as e:
            if e.status == 403:
                raise
            return DryRunOut(valid=False, problems=e.errors or [e.detail])
        try:
            adm = admit(spec)
        except SubmitError as e:
            return DryRunOut(valid=False, problems=e.problems)
        snap, _ = service.views.snapshot()
        res = spec.resources
        probe = JobRequest(_PROBE_ID, spec.team, spec.priority, clock.now(), adm.gpus, adm.memory_per_gpu_mib,
                           res.gpu_model, res.cpus_per_gpu, shareable=res.shareable,
                           expected_duration_s=res.expected_duration_s, user=spec.user)
        decision = service.policy(replace(snap, pending=snap.pending + (probe,)))
        starts = any(s.job_id == _PROBE_ID for s in decision.to_start)
        return DryRunOut(valid=True, gpus=adm.gpus, memory_per_gpu_mib=adm.memory_per_gpu_mib,
                         train_records=adm.train_records, validation_records=adm.validation_records,
                         would_start_now=starts, pending_reason=None if starts else decision.pending.get(_PROBE_ID),
                         estimated_start_at=snap.now if starts else decision.estimated_start.get(_PROBE_ID))

    @app.get("/v1/jobs")
    def list_jobs(p: Who, state: Annotated[list[JobState] | None, Query()] = None,
                  team: Annotated[str | None, Query(max_length=63)] = None,
                  user: Annotated[str | None, Query(max_length=63)] = None,
                  since: Annotated[float | None, Query(description="Unix time: submitted or changed since")] = None,
                  cursor: Annotated[str | None, Query(pattern=r"^[0-9]{1,18}$", description="from next_cursor")] = None,
                  offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
                  limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> JobPage:
        """Jobs in id order, filtered; non-admins see their own team's jobs only."""
        teams = p.teams_filter()
        if team is not None:
            teams = [team] if teams is None or team in teams else []
        jobs = store.job_page(states=state, teams=teams, user=user, since=since,
                              after_id=int(cursor or 0), offset=offset, limit=limit + 1)
        more = len(jobs) > limit
        jobs = jobs[:limit]
        return JobPage(items=[JobOut.of(j) for j in jobs], next_cursor=str(jobs[-1].id) if more else None)

    @app.get("/v1/jobs/{job_id}")
    def get_job(job_id: JobId, p: Who) -> JobOut:
        return JobOut.of(visible_job(p, job_id))

    @app.post("/v1/jobs/{job_id}/cancel")
    def cancel(job_id: JobId, p: Who) -> JobOut:
        """Queued and held jobs end at once (held ones here, queued ones on the scheduler's next
        cycle); running ones are stopped."""
        job = visible_job(p, job_id)
        if job.state.terminal:
            raise Problem(409, "Job already finished", f"job {job_id} is {job.state.value}")
        if job.state is JobState.HELD:
            try:
                return JobOut.of(store.transition(job_id, JobState.HELD, JobState.CANCELLED, now=clock.now(),
                                                  reason=f"cancelled by {p.user} while held", finished_at=clock.now()))
            except Conflict:
                job = store.get(job_id)  # released meanwhile: cancel it the normal way
        return JobOut.of(store.request_cancel(job_id))  # the service loop carries it out

    def move(job_id: JobId, p: Who, src: JobState, dst: JobState, verb: str, reason: str) -> JobOut:
        job = visible_job(p, job_id)
        if job.cancel_requested:
            raise Problem(409, f"Cannot {verb} job", f"job {job_id} is being cancelled")
        if job.state is not src:
            done = {"hold": "held", "release": "released"}[verb]
            raise Problem(409, f"Cannot {verb} job", f"job {job_id} is {job.state.value}; only {src.value} jobs "
                          f"can be {done}" + ("" if verb != "hold" else " (a job already placed cannot be held)"))
        try:
            return JobOut.of(store.transition(job_id, src, dst, reason=reason, now=clock.now()))
        except Conflict:
            now_state = store.get(job_id).state.value
            raise Problem(409, f"Cannot {verb} job", f"job {job_id} is {now_state}") from None

    @app.post("/v1/jobs/{job_id}/hold")
    def hold(job_id: JobId, p: Who) -> JobOut:
        """Keep a queued job from starting until it is released (`scontrol hold`)."""
        return move(job_id, p, JobState.QUEUED, JobState.HELD, "hold", f"held by {p.user}")

    @app.post("/v1/jobs/{job_id}/release")
    def release(job_id: JobId, p: Who) -> JobOut:
        return move(job_id, p, JobState.HELD, JobState.QUEUED, "release", f"released by {p.user}")

    @app.post("/v1/jobs/{job_id}/requeue")
    def requeue(job_id: JobId, p: Who) -> JobOut:
        """Stop a running job at a checkpoint and put it back in the queue (it resumes from the
        checkpoint when it is scheduled again)."""
        job = visible_job(p, job_id)
        if job.state not in (JobState.STARTING, JobState.RUNNING):
            raise Problem(409, "Cannot requeue job", f"job {job_id} is {job.state.value}; only STARTING or RUNNING "
                          "jobs can be requeued")
        service.requeue(job_id, f"requeued by {p.user}")
        return JobOut.of(store.get(job_id))

    @app.get("/v1/jobs/{job_id}/events")
    def events(job_id: JobId, p: Who) -> list[EventOut]:
        visible_job(p, job_id)
        return [EventOut.model_validate(asdict(e)) for e in store.events(job_id)]

    def read_log(job_id: int, offset: int, limit: int = 1 << 20) -> tuple[bytes, int]:
        path = service.log_path(job_id)
        if not path.exists():
            return b"", offset
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read(limit)
        cut = data.rfind(b"\n") + 1  # whole lines only
        return data[:cut], offset + cut

    @app.get("/v1/jobs/{job_id}/logs")
    def logs(job_id: JobId, p: Who, offset: Annotated[int, Query(ge=0, le=2**53)] = 0) -> LogChunk:
        job = visible_job(p, job_id)
        data, end = read_log(job_id, offset)
        return LogChunk(text=data.decode(errors="replace"), offset=end, terminal=job.state.terminal)

    @app.get("/v1/jobs/{job_id}/logs/stream", response_class=StreamingResponse,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "the log as it grows"}})
    async def log_stream(job_id: JobId, p: Who, follow: bool = False,
                         timeout_s: Annotated[float, Query(gt=0, le=86400)] = 3600) -> StreamingResponse:
        """The job's log as plain text; with `follow`, kept open and streamed as lines arrive
        until the job ends (or `timeout_s` passes)."""
        visible_job(p, job_id)

        async def lines():
            offset, deadline = 0, time.monotonic() + timeout_s
            while True:
                data, offset = read_log(job_id, offset)
                if data:
                    yield data
                    continue
                if not follow or store.get(job_id).state.terminal or time.monotonic() > deadline:
                    return
                await asyncio.sleep(0.5)

        return StreamingResponse(lines(), media_type="text/plain")

    # -- queue and summary -------------------------------------------------------------------------
    @app.get("/v1/queue")
    def queue(p: Who, team: Annotated[str | None, Query(max_length=63)] = None) -> list[QueueEntry]:
        """Queued jobs in start order, with why each waits and its estimated start (Slurm's
        `squeue --start`), as the scheduler recorded them at its last cycle (nothing is planned
        here): jobs with an estimated start by that time, then the rest by priority and
        submission. A job submitted since that cycle has no reason yet. Positions count every
        team's jobs."""
        rows = store.queue_rows()
        rows.sort(key=lambda r: (r.estimated_start_at is None, r.estimated_start_at or 0.0, -r.priority,
                                 r.submitted_at, r.id))
        return [QueueEntry(position=pos, id=r.id, name=r.name, team=r.team, user=r.user, priority=r.priority,
                           state=JobState.QUEUED.value, gpus=r.gpus, submitted_at=r.submitted_at,
                           pending_reason=r.pending_reason, estimated_start_at=r.estimated_start_at)
                for pos, r in enumerate(rows, 1) if p.sees_team(r.team) and (team is None or r.team == team)]

    def team_out(name: str, t: TeamConfig, jobs) -> TeamOut:
        mine = [j for j in jobs if j.team == name]
        active = [j for j in mine if j.state in ACTIVE]
        queued = [j for j in mine if j.state is JobState.QUEUED]
        return TeamOut(name=name, **t.model_dump(), gpus_in_use=sum(j.gpus for j in active),
                       gpus_queued=sum(j.gpus for j in queued), jobs_running=len(active), jobs_queued=len(queued))

    def live_jobs():
        return store.jobs(states=[JobState.QUEUED, *ACTIVE])

    @app.get("/v1/metrics/summary")
    def metrics_summary(p: Who) -> MetricsSummary:
        """Cluster totals (GPUs, memory, utilization) and, per visible team, its quota and use."""
        nodes = service.inventory.node_views(service.views.running_views(store.active_jobs()))
        gpus = [g for n in nodes for g in n.gpus]
        counts: dict[str, int] = {}
        for (state, t), n in store.count_by_state_team().items():
            if p.sees_team(t):
                counts[state] = counts.get(state, 0) + n
        jobs = live_jobs()
        teams = [team_out(n, t, jobs) for n, t in teams_now.get().items() if p.sees_team(n)]
        return MetricsSummary(
            jobs_by_state=counts, gpus_total=len(gpus), gpus_healthy=sum(g.healthy for g in gpus),
            gpus_allocated=sum(bool(g.allocated_to) for g in gpus),
            gpu_utilization_mean=sum(g.utilization for g in gpus) / len(gpus) if gpus else 0.0,
            memory_used_mib=sum(g.memory_used_mib for g in gpus),
            memory_total_mib=sum(g.memory_total_mib for g in gpus), teams=teams)


    return teams_now, team_out, live_jobs
