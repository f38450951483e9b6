"""REST API (`/v1`), served by the daemon next to `/metrics` and `/healthz`.

Errors are RFC 9457 problem details (`application/problem+json`); validation errors carry
`errors`: one 'field: message' string per invalid field. Auth and tenancy arrive with issue #7;
until then the API listens on 127.0.0.1 only by default.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from pydantic import ValidationError

from monitoring.exposition import render
from scheduler.admission import SubmitError, check_submission
from scheduler.lifecycle import JobState
from scheduler.service import Service
from scheduler.spec import JobSpec, format_validation_error
from scheduler.models import EventOut, JobOut, LogChunk, SubmitIn
from scheduler.store import UnknownJob


class Problem(Exception):
    def __init__(self, status: int, title: str, detail: str = "", errors: list[str] | None = None):
        self.status, self.title, self.detail, self.errors = status, title, detail, errors or []


def _validate_spec(body: SubmitIn) -> JobSpec:
    try:
        spec = JobSpec.model_validate(body.spec)
    except ValidationError as e:
        raise Problem(422, "Invalid job spec", errors=format_validation_error(e, body.source or "")) from None
    relative = [f"{f}: {p!r} must be an absolute path (the CLI resolves paths against the spec file)"
                for f, p in spec.path_fields().items() if p is not None and not Path(p).is_absolute()]
    if relative:
        raise Problem(422, "Invalid job spec", errors=relative)
    return spec


def create_app(service: Service, registry: CollectorRegistry, user: str = "local") -> FastAPI:
    app = FastAPI(title="Shoal", version="0.1.0", description="GPU scheduler for LLM fine-tuning")
    store, clock = service.store, service.clock

    @app.exception_handler(Problem)
    async def _problem(_: Request, exc: Problem) -> JSONResponse:
        body = {"type": "about:blank", "title": exc.title, "status": exc.status, "detail": exc.detail}
        if exc.errors:
            body["errors"] = exc.errors
        return JSONResponse(body, status_code=exc.status, media_type="application/problem+json")

    @app.exception_handler(UnknownJob)
    async def _unknown(request: Request, exc: UnknownJob) -> JSONResponse:
        return await _problem(request, Problem(404, "Job not found", f"job {exc.job_id} does not exist"))

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(render(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.post("/v1/jobs", status_code=201)
    def submit(body: SubmitIn) -> JobOut:
        spec = _validate_spec(body)
        snap, _ = service.snapshot()
        try:
            adm = check_submission(spec, service.config, snap.nodes, snap.quotas)
        except SubmitError as e:
            raise Problem(422, "Job cannot be submitted", errors=e.problems) from None
        job = store.submit(
            spec=spec.model_dump(mode="json"), name=spec.name, team=spec.team, user=spec.user or user,
            priority=spec.priority, gpus=adm.gpus, memory_per_gpu_mib=adm.memory_per_gpu_mib,
            now=clock.now(),
            reason=f"submitted: {adm.gpus} GPU(s), ~{adm.memory_per_gpu_mib} MiB each; "
                   f"{adm.train_records} training records",
        )
        return JobOut.of(job)

    @app.get("/v1/jobs")
    def list_jobs(state: list[JobState] | None = Query(default=None), team: str | None = None,
                  limit: int = Query(default=1000, ge=1, le=10000)) -> list[JobOut]:
        return [JobOut.of(j) for j in store.jobs(states=state, team=team, limit=limit)]

    @app.get("/v1/jobs/{job_id}")
    def get_job(job_id: int) -> JobOut:
        return JobOut.of(store.get(job_id))

    @app.post("/v1/jobs/{job_id}/cancel")
    def cancel(job_id: int) -> JobOut:
        job = store.get(job_id)
        if job.state.terminal:
            raise Problem(409, "Job already finished", f"job {job_id} is {job.state.value}")
        return JobOut.of(store.request_cancel(job_id))  # the service loop carries it out

    @app.get("/v1/jobs/{job_id}/events")
    def events(job_id: int) -> list[EventOut]:
        return [EventOut.model_validate(asdict(e)) for e in store.events(job_id)]

    @app.get("/v1/jobs/{job_id}/logs")
    def logs(job_id: int, offset: int = Query(default=0, ge=0)) -> LogChunk:
        job = store.get(job_id)
        path = service.log_path(job_id)
        text, end = "", offset
        if path.exists():
            with path.open("rb") as f:
                f.seek(offset)
                data = f.read(1 << 20)
            cut = data.rfind(b"\n") + 1  # whole lines only
            text, end = data[:cut].decode(errors="replace"), offset + cut
        return LogChunk(text=text, offset=end, terminal=job.state.terminal)

    return app
