"""REST API (`/v1`), served by the daemon next to `/metrics` and `/healthz`.

Every request but `/healthz`, `/metrics` and the OpenAPI pages carries `Authorization: Bearer
<token>` (scheduler/auth.py). What each role may call is the table `POLICY` below, one entry per
(method, path); `create_app` refuses to build an app with a route the table does not name, and
tests/api/test_policy.py checks every entry for every role. Inside an allowed call, a non-admin
sees only their own team: another team's job answers 404 exactly like a job that does not exist
(no leak of its existence), while an action the caller's role may not take answers 403.

Errors are RFC 9457 problem details (`application/problem+json`): `title`, `status`, `detail`,
and for invalid input `errors` (one 'field.path: message' string per problem) and
`invalid_params` ([{name, reason}]), also for FastAPI's own request validation.
"""

import asyncio
import csv
import hashlib
import io
import json
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from monitoring.exposition import render
from scheduler.admission import Cold, SubmitError, check_submission
from scheduler.auth import ADMINS, ALL_ROLES, TEAM_ADMIN_FIELDS, WRITERS, AuthError, Principal, TokenAuthority
from scheduler.lifecycle import ACTIVE, JobState
from scheduler.models import (
    CohortIn, CohortOut, DrainIn, DryRunOut, EventOut, GpuOut, JobOut, JobPage, LogChunk, MetricsSummary,
    NodeOut, QueueEntry, Role, SubmitIn, TeamIn, TeamOut, TeamPatch, TokenCreated, TokenCreateIn, TokenOut,
    UsageGroupOut, UsageReport, UserIn, UserOut, WhoAmI,
)
from scheduler.policy import JobRequest
from scheduler.service import Service
from scheduler.spec import ClusterConfig, CohortConfig, JobSpec, TeamConfig, format_validation_error
from scheduler.store import Conflict, IdempotencyMismatch, UnknownJob

# -- who may call what -------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    roles: frozenset[Role] | None  # None: public, no token needed
    note: str = ""  # the extra, per-team rule the handler applies


PUBLIC = Rule(None)
ANYONE = Rule(ALL_ROLES, "non-admins see their own team only")
WRITE = Rule(WRITERS, "non-admins act on their own team's jobs only")
ADMIN = Rule(ADMINS)
TEAM_ADMIN = Rule(ADMINS | {Role.team_admin}, "team admins: their own team only")

POLICY: dict[tuple[str, str], Rule] = {
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/metrics"): PUBLIC,
    ("GET", "/v1/whoami"): ANYONE,
    ("POST", "/v1/jobs"): WRITE,
    ("POST", "/v1/jobs/dry-run"): WRITE,
    ("GET", "/v1/jobs"): ANYONE,
    ("GET", "/v1/jobs/{job_id}"): ANYONE,
    ("POST", "/v1/jobs/{job_id}/cancel"): WRITE,
    ("POST", "/v1/jobs/{job_id}/hold"): WRITE,
    ("POST", "/v1/jobs/{job_id}/release"): WRITE,
    ("POST", "/v1/jobs/{job_id}/requeue"): WRITE,
    ("GET", "/v1/jobs/{job_id}/events"): ANYONE,
    ("GET", "/v1/jobs/{job_id}/logs"): ANYONE,
    ("GET", "/v1/jobs/{job_id}/logs/stream"): ANYONE,
    ("GET", "/v1/queue"): ANYONE,
    ("GET", "/v1/metrics/summary"): ANYONE,
    ("GET", "/v1/teams"): ANYONE,
    ("GET", "/v1/teams/{name}"): ANYONE,
    ("PUT", "/v1/teams/{name}"): ADMIN,
    ("PATCH", "/v1/teams/{name}"): Rule(ADMINS | {Role.team_admin},
                                        "team admins: own team, lending/borrowing limits only"),
    ("DELETE", "/v1/teams/{name}"): ADMIN,
    ("GET", "/v1/cohorts"): ANYONE,
    ("PUT", "/v1/cohorts/{name}"): ADMIN,
    ("DELETE", "/v1/cohorts/{name}"): ADMIN,
    ("GET", "/v1/users"): TEAM_ADMIN,
    ("PUT", "/v1/users/{name}"): ADMIN,
    ("DELETE", "/v1/users/{name}"): ADMIN,
    ("POST", "/v1/tokens"): Rule(ADMINS | {Role.team_admin}, "team admins: non-admin tokens of their own team"),
    ("GET", "/v1/tokens"): Rule(ALL_ROLES, "admins: all; team admins: their team's; others: their own"),
    ("DELETE", "/v1/tokens/{token_id}"): Rule(ALL_ROLES, "as GET /v1/tokens; others answer 404"),
    ("GET", "/v1/usage"): ANYONE,
    ("GET", "/v1/nodes"): ANYONE,
    ("POST", "/v1/nodes/{name}/drain"): ADMIN,
    ("POST", "/v1/nodes/{name}/undrain"): ADMIN,
}


# -- problems ----------------------------------------------------------------------------------

class Problem(Exception):
    def __init__(self, status: int, title: str, detail: str = "", errors: list[str] | None = None,
                 headers: dict[str, str] | None = None):
        self.status, self.title, self.detail, self.errors = status, title, detail, errors or []
        self.headers = headers


class ProblemOut(BaseModel):
    """RFC 9457 problem details."""
    type: str = "about:blank"
    title: str
    status: int
    detail: str = ""
    errors: list[str] | None = None  # 'field.path: message', one per invalid field
    invalid_params: list[dict[str, str]] | None = None  # [{name, reason}] (RFC 9457 §3)


_PROBLEM_CONTENT = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/ProblemOut"}}}
_ERRORS = {code: {"description": desc, "content": _PROBLEM_CONTENT} for code, desc in [
    (400, "Bad request"), (401, "Missing, unknown, expired or revoked token"),
    (403, "The caller's role may not do this"), (404, "No such resource (or not visible to the caller)"),
    (409, "Conflicts with the resource's current state"), (422, "Invalid input; every field named"),
]}


def _problem_response(p: Problem) -> JSONResponse:
    body: dict[str, Any] = {"type": "about:blank", "title": p.title, "status": p.status, "detail": p.detail}
    if p.errors:
        body["errors"] = p.errors
        pairs = [e.split(": ", 1) for e in p.errors]
        body["invalid_params"] = [{"name": x[0], "reason": x[1]} if len(x) == 2 else {"name": "", "reason": x[0]}
                                  for x in pairs]
    return JSONResponse(body, status_code=p.status, media_type="application/problem+json", headers=p.headers)


def _field_path(loc: tuple) -> str:
    return ".".join(str(x) for x in loc) or "(request)"


_QUERY_SHAPES: dict[int, tuple[frozenset[str], frozenset[str]]] = {}


async def _strict_query(request: Request) -> None:
    """Query strings are checked like bodies: an unknown parameter, or a single-valued one given
    twice, is a 422 naming it (FastAPI alone ignores the one and keeps the last of the other).
    (`async`: FastAPI runs a plain `def` dependency in its thread pool, a thread hop per request
    for a few dictionary look-ups.)"""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    shape = _QUERY_SHAPES.get(id(route))
    if shape is None:
        fields, todo = [], [route.dependant]
        while todo:  # the route's own query parameters and those of its dependencies
            d = todo.pop()
            fields += d.query_params
            todo += d.dependencies
        names = frozenset(f.alias for f in fields)
        lists = frozenset(f.alias for f in fields if "list" in str(f.field_info.annotation).lower())
        shape = _QUERY_SHAPES[id(route)] = (names, lists)
    names, lists = shape
    errors = []
    for key in dict.fromkeys(request.query_params.keys()):
        if key not in names:
            errors.append(f"query.{key or '(empty name)'}: unknown parameter (known: {', '.join(sorted(names)) or 'none'})")
        elif key not in lists and len(request.query_params.getlist(key)) > 1:
            errors.append(f"query.{key}: given {len(request.query_params.getlist(key))} times; takes one value")
    if errors:
        raise Problem(422, "Invalid request", f"{len(errors)} invalid field(s)", errors)


JobId = Annotated[int, PathParam(ge=0, le=2**53, description="job id")]


def _not_found(job_id: int) -> Problem:
    return Problem(404, "Job not found", f"job {job_id} does not exist")


# -- the app -----------------------------------------------------------------------------------

def _digest(body: Any) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class _Cached:
    """A value recomputed at most every `ttl_s` seconds (admission context, queue order)."""

    def __init__(self, fn: Callable[[], Any], ttl_s: float):
        self.fn, self.ttl_s = fn, ttl_s
        self._value, self._at = None, -1e18
        self._lock = threading.Lock()

    def get(self) -> Any:
        with self._lock:
            now = time.monotonic()
            if now - self._at > self.ttl_s:
                self._value, self._at = self.fn(), now
            return self._value

    def clear(self) -> None:
        with self._lock:
            self._at = -1e18

    def fresh(self) -> bool:
        """get() would answer without recomputing."""
        return time.monotonic() - self._at <= self.ttl_s


class SubmitBatcher:
    """Group commit. Request threads hand their submission to one writer thread, which commits
    everything that queued up meanwhile (up to `max_batch`) in ONE transaction
    (`Store.submit_many`) and answers each request with its own result. Under load this turns
    N transactions into one; alone, a request waits for nobody."""

    def __init__(self, store, max_batch: int = 256):
        import queue

        self.store, self.max_batch = store, max_batch
        self._q: "queue.Queue" = queue.Queue()
        self._empty = queue.Empty
        threading.Thread(target=self._run, name="shoal-submit-batcher", daemon=True).start()

    def submit(self, item: dict) -> Any:
        """Blocks until the batch holding `item` committed; its result."""
        return self._enqueue(item).result()

    async def submit_async(self, item: dict) -> Any:
        """`submit` for the event loop: awaits the commit without holding a thread."""
        return await asyncio.wrap_future(self._enqueue(item))

    def _enqueue(self, item: dict):
        from concurrent.futures import Future

        fut: Future = Future()
        self._q.put((item, fut))
        return fut

    def _run(self) -> None:
        while True:
            batch = [self._q.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._q.get_nowait())
                except self._empty:
                    break
            try:
                results = self.store.submit_many([item for item, _ in batch])
            except Exception as e:  # noqa: BLE001 - each waiting request gets the error
                for _, fut in batch:
                    fut.set_exception(e)
                continue
            for (_, fut), res in zip(batch, results):
                fut.set_result(res)


_JOB_OUT_FIELDS = tuple(JobOut.model_fields)


def _job_json(job) -> bytes:
    """A store JobRecord as JobOut's JSON."""
    return JobOut.model_construct(**{k: getattr(job, k) for k in _JOB_OUT_FIELDS}).model_dump_json().encode()


_PROBE_ID = 2**62  # the job id a dry run's probe gets: after every real job of equal rank


def create_app(service: Service, registry: CollectorRegistry, user: str = "local",
               auth: TokenAuthority | None = None) -> FastAPI:
    """`auth`: the token authority; without one, a throw-away secret (no token verifies, so
    only public routes answer). `user` is unused (kept for callers of the earlier signature)."""
    from scheduler.auth import TokenAuthority as _TA
    import secrets as _secrets

    store, clock = service.store, service.clock
    auth = auth or _TA(store, _secrets.token_bytes(32))
    store.seed_tenancy(service.config, clock.now())
    bearer = HTTPBearer(auto_error=False, description="a Shoal API token (`shoal token create`)")

    app = FastAPI(title="Shoal", version="0.2.0", description="GPU scheduler for LLM fine-tuning",
                  responses=_ERRORS, dependencies=[Depends(_strict_query)])

    # -- errors --------------------------------------------------------------------------------
    @app.exception_handler(Problem)
    async def _problem(_: Request, exc: Problem) -> JSONResponse:
        return _problem_response(exc)

    @app.exception_handler(UnknownJob)
    async def _unknown(_: Request, exc: UnknownJob) -> JSONResponse:
        return _problem_response(_not_found(exc.job_id))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [f"{_field_path(e['loc'])}: {e['msg']}" for e in exc.errors()]
        return _problem_response(Problem(422, "Invalid request", f"{len(errors)} invalid field(s)", errors))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _problem_response(Problem(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None)))

    # -- auth ----------------------------------------------------------------------------------
    async def authorize(request: Request,
                        cred: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Principal | None:
        """`async` (no thread hop): a verified token is a cache hit; a miss is one indexed read."""
        route = request.scope.get("route")
        rule = POLICY.get((request.method, getattr(route, "path", "")))
        if rule is None:  # create_app refuses such routes; a HEAD or similar lands here
            raise Problem(405, "Method not allowed")
        if rule.roles is None:
            return None
        if cred is None:
            raise Problem(401, "Authentication required", "send 'Authorization: Bearer <token>' "
                          "(shoal token create; the local admin token is in $SHOAL_HOME/admin.token)",
                          headers={"WWW-Authenticate": "Bearer"})
        try:
            p = auth.verify(cred.credentials)
        except AuthError as e:
            raise Problem(401, "Invalid token", str(e),
                          headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}) from None
        if p.role not in rule.roles:
            raise Problem(403, "Forbidden", f"role {p.role.value} may not call {request.method} {route.path}")
        return p

    Who = Annotated[Principal, Depends(authorize)]

    def visible_job(p: Principal, job_id: int):
        try:
            job = store.get(job_id)
        except UnknownJob:
            raise _not_found(job_id) from None
        if not p.sees_team(job.team):
            raise _not_found(job_id)  # same answer as a missing job: no existence leak
        return job

    def own_team(p: Principal, team: str, what: str) -> None:
        if not p.sees_team(team):
            raise Problem(403, "Forbidden", f"{what}: you belong to team {p.team!r}, not {team!r}")

    # -- public ----------------------------------------------------------------------------------
    @app.get("/metrics", include_in_schema=False)  # public routes (POLICY: PUBLIC) take no token
    def metrics() -> Response:
        return Response(render(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/whoami")
    def whoami(p: Who) -> WhoAmI:
        return WhoAmI(user=p.user, team=p.team, role=p.role, token_id=p.token_id)

    # -- jobs ------------------------------------------------------------------------------------
    teams_now = _Cached(lambda: store.team_configs(service.config), 1.0)

    def admission_context() -> tuple[ClusterConfig, Any, Any]:
        """What admission checks a spec against (teams, nodes, quotas), refreshed once a second:
        they change at human speed, and reading them per submit would cost more than the submit."""
        snap_nodes = service.inventory.node_views(service.running_views(store.active_jobs()))
        cfg = service.config.model_copy(update={"teams": teams_now.get(),
                                                "cohorts": store.cohort_configs(service.config)})
        return cfg, snap_nodes, service.quotas()

    admission_now = _Cached(admission_context, 1.0)

    def validate_spec(body: SubmitIn, p: Principal) -> JobSpec:
        try:
            spec = JobSpec.model_validate(body.spec)
        except ValidationError as e:
            raise Problem(422, "Invalid job spec", errors=format_validation_error(e, body.source or "")) from None
        relative = [f"{f}: {v!r} must be an absolute path (the CLI resolves paths against the spec file)"
                    for f, v in spec.path_fields().items() if v is not None and not Path(v).is_absolute()]
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

    batcher = SubmitBatcher(store)

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
        snap, _ = service.snapshot()
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
        nodes = service.inventory.node_views(service.running_views(store.active_jobs()))
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

    # -- teams, cohorts, users, tokens -------------------------------------------------------------
    _register_tenancy(app, service, auth, Who, teams_now, team_out, live_jobs)
    _register_nodes(app, service, Who)
    _register_usage(app, service, Who)

    plain_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = plain_openapi()
            schema["components"]["schemas"]["ProblemOut"] = ProblemOut.model_json_schema(
                ref_template="#/components/schemas/{model}")
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    missing = [(m, r.path) for r in app.routes if isinstance(r, APIRoute) for m in sorted(r.methods)
               if (m, r.path) not in POLICY]
    if missing:
        raise RuntimeError(f"routes without an entry in scheduler.api.POLICY: {missing}")
    return app


def _register_tenancy(app: FastAPI, service: Service, auth: TokenAuthority, Who, teams_now: _Cached,
                      team_out, live_jobs) -> None:
    store, clock = service.store, service.clock

    def teams() -> dict[str, TeamConfig]:
        return teams_now.get()

    def changed() -> None:
        teams_now.clear()

    def check_team(name: str, t: TeamConfig) -> None:
        problems = []
        if t.cohort is not None and t.cohort not in store.cohort_configs(service.config):
            problems.append(f"cohort: {t.cohort!r} is not a cohort (create it with PUT /v1/cohorts/{t.cohort})")
        for model in t.gpus_by_model:
            if model not in service.config.gpu_models:
                problems.append(f"gpus_by_model.{model}: not a GPU model of this cluster "
                                f"(known: {', '.join(sorted(service.config.gpu_models))})")
        if problems:
            raise Problem(422, "Invalid team", errors=problems)

    def get_team(p: Principal, name: str) -> TeamConfig:
        if not p.sees_team(name):
            raise Problem(403, "Forbidden", f"you belong to team {p.team!r}, not {name!r}")
        t = teams().get(name)
        if t is None:
            raise Problem(404, "Team not found", f"team {name!r} does not exist")
        return t

    Name = Annotated[str, Depends(_path_name)]

    @app.get("/v1/teams")
    def list_teams(p: Who) -> list[TeamOut]:
        """Teams with quota, cohort, budget and current use (non-admins: their own team)."""
        jobs = live_jobs()
        return [team_out(n, t, jobs) for n, t in teams().items() if p.sees_team(n)]

    @app.get("/v1/teams/{name}")
    def read_team(name: Name, p: Who) -> TeamOut:
        return team_out(name, get_team(p, name), live_jobs())

    @app.put("/v1/teams/{name}")
    def put_team(name: Name, body: TeamIn, p: Who) -> TeamOut:
        """Create or replace a team (its quota, cohort, limits, weight and budget)."""
        t = TeamConfig.model_validate(body.model_dump())
        check_team(name, t)
        store.put_team(name, t, clock.now())
        changed()
        return team_out(name, t, live_jobs())

    @app.patch("/v1/teams/{name}")
    def patch_team(name: Name, body: TeamPatch, p: Who) -> TeamOut:
        """Change some of a team's settings. A team admin may change only their own team's
        `lending_limit` and `borrowing_limit` (within its cohort)."""
        cur = get_team(p, name)
        changes = body.model_dump(exclude_unset=True)
        if not p.is_admin:
            bad = sorted(set(changes) - TEAM_ADMIN_FIELDS)
            if bad:
                raise Problem(403, "Forbidden", f"team admins may change only {', '.join(sorted(TEAM_ADMIN_FIELDS))}; "
                              f"not {', '.join(bad)} (ask a cluster admin)")
            if changes.get("borrowing_limit") is not None and cur.cohort is None:
                raise Problem(422, "Invalid team", errors=["borrowing_limit: the team is in no cohort; "
                                                           "there is nobody to borrow from"])
        for k in ("gpus", "weight", "gpus_by_model"):
            if k in changes and changes[k] is None:
                raise Problem(422, "Invalid team", errors=[f"{k}: may not be null"])
        t = TeamConfig.model_validate({**cur.model_dump(), **changes})
        check_team(name, t)
        store.put_team(name, t, clock.now())
        changed()
        return team_out(name, t, live_jobs())

    @app.delete("/v1/teams/{name}", status_code=204)
    def delete_team(name: Name, p: Who) -> Response:
        if name not in teams():
            raise Problem(404, "Team not found", f"team {name!r} does not exist")
        busy = [j.id for j in live_jobs() if j.team == name]
        if busy:
            raise Problem(409, "Team has jobs", f"team {name!r} has queued or running jobs {busy[:10]}; cancel them first")
        store.delete_team(name, clock.now())
        changed()
        return Response(status_code=204)

    @app.get("/v1/cohorts")
    def list_cohorts(p: Who) -> list[CohortOut]:
        t = teams()
        return [CohortOut(name=n, parent=c.parent, teams=sorted(k for k, v in t.items() if v.cohort == n))
                for n, c in store.cohort_configs(service.config).items()]

    @app.put("/v1/cohorts/{name}")
    def put_cohort(name: Name, body: CohortIn, p: Who) -> CohortOut:
        cohorts = store.cohort_configs(service.config)
        if body.parent is not None and body.parent not in cohorts:
            raise Problem(422, "Invalid cohort", errors=[f"parent: {body.parent!r} is not a cohort"])
        parent = body.parent
        while parent is not None:  # no cycles
            if parent == name:
                raise Problem(422, "Invalid cohort", errors=[f"parent: {body.parent!r} would make a cycle"])
            parent = cohorts[parent].parent if parent in cohorts else None
        store.put_cohort(name, CohortConfig(parent=body.parent), clock.now())
        changed()
        return CohortOut(name=name, parent=body.parent, teams=sorted(k for k, v in teams().items() if v.cohort == name))

    @app.delete("/v1/cohorts/{name}", status_code=204)
    def delete_cohort(name: Name, p: Who) -> Response:
        cohorts = store.cohort_configs(service.config)
        if name not in cohorts:
            raise Problem(404, "Cohort not found", f"cohort {name!r} does not exist")
        users = sorted([k for k, v in teams().items() if v.cohort == name] +
                       [k for k, v in cohorts.items() if v.parent == name])
        if users:
            raise Problem(409, "Cohort in use", f"cohort {name!r} is used by {', '.join(users)}")
        store.delete_cohort(name, clock.now())
        changed()
        return Response(status_code=204)

    def user_out(u) -> UserOut:
        return UserOut(name=u.name, team=u.team, role=u.role, created_at=u.created_at)

    @app.get("/v1/users")
    def list_users(p: Who) -> list[UserOut]:
        return [user_out(u) for u in store.users(team=None if p.is_admin else p.team)]

    def check_membership(team: str | None, role: Role) -> None:
        if role is not Role.admin and team is None:
            raise Problem(422, "Invalid user", errors=[f"team: required for role {role.value}"])
        if team is not None and team not in teams():
            raise Problem(422, "Invalid user", errors=[f"team: {team!r} is not a team"])

    @app.put("/v1/users/{name}")
    def put_user(name: Annotated[str, Depends(_path_user)], body: UserIn, p: Who) -> UserOut:
        """Create a user or change their team and role (their tokens follow at once)."""
        check_membership(body.team, body.role)
        u = store.put_user(name, body.team, body.role.value, clock.now())
        auth.forget()
        return user_out(u)

    @app.delete("/v1/users/{name}", status_code=204)
    def delete_user(name: Annotated[str, Depends(_path_user)], p: Who) -> Response:
        """Disable a user and revoke their tokens."""
        if not store.delete_user(name, clock.now()):
            raise Problem(404, "User not found", f"user {name!r} does not exist")
        auth.forget()
        return Response(status_code=204)

    def token_out(t) -> TokenOut:
        return TokenOut(**asdict(t))

    @app.post("/v1/tokens", status_code=201)
    def create_token(body: TokenCreateIn, p: Who) -> TokenCreated:
        """A new token for `user` (created, or moved to this team and role). The token is in
        this answer only; the server keeps a keyed hash."""
        if not p.is_admin and (body.role is Role.admin or body.team != p.team):
            raise Problem(403, "Forbidden", f"team admins create non-admin tokens for team {p.team!r} only")
        check_membership(body.team, body.role)
        existing = store.get_user(body.user)
        if not p.is_admin and existing is not None and existing.team not in (None, p.team) \
                and existing.role != "disabled":
            raise Problem(403, "Forbidden", f"user {body.user!r} belongs to another team")
        token, rec = auth.create(body.user, body.team, body.role, ttl_s=body.expires_in_s,
                                 description=body.description)
        return TokenCreated(**asdict(rec), token=token, team=body.team, role=body.role)

    def visible_tokens(p: Principal):
        if p.is_admin:
            return store.tokens()
        if p.role is Role.team_admin:
            return store.tokens(team=p.team)
        return store.tokens(user=p.user)

    @app.get("/v1/tokens")
    def list_tokens(p: Who) -> list[TokenOut]:
        return [token_out(t) for t in visible_tokens(p)]

    @app.delete("/v1/tokens/{token_id}")
    def revoke_token(token_id: Annotated[str, Depends(_path_token)], p: Who) -> TokenOut:
        if token_id not in {t.id for t in visible_tokens(p)}:
            raise Problem(404, "Token not found", f"token {token_id} does not exist")
        rec = store.revoke_token(token_id, clock.now())
        auth.forget()
        return token_out(rec)


def _register_nodes(app: FastAPI, service: Service, Who) -> None:
    store, clock = service.store, service.clock

    @app.get("/v1/nodes")
    def nodes(p: Who) -> list[NodeOut]:
        """Nodes and their GPUs with live readings (memory, utilization, health) and the Shoal
        jobs on each; drained nodes take no new jobs."""
        active = store.active_jobs()
        team_of = {j.id: j.team for j in active}
        recorded = store.nodes()  # drained (operator or GPU fault) / lost, as the service recorded it
        out = []
        for n in service.inventory.node_views(service.running_views(active)):
            rec = recorded.get(n.node_id)
            d = rec if rec is not None and rec.drained else None
            gpus = []
            for g in n.gpus:
                seen = [j for j in g.allocated_to if p.sees_team(team_of.get(j, ""))]
                gpus.append(GpuOut(index=g.index, model=g.model, memory_total_mib=g.memory_total_mib,
                                   memory_used_mib=g.memory_used_mib, reserved_mib=g.reserved_mib,
                                   utilization=g.utilization, healthy=g.healthy, jobs=seen,
                                   hidden_jobs=len(g.allocated_to) - len(seen)))
            out.append(NodeOut(id=n.node_id, name=n.name, schedulable=n.schedulable and d is None,
                               drained=d is not None, drain_reason=d.drain_reason if d else None, cpus=n.cpus,
                               cpus_held=n.cpus_held, gpus=gpus))
        return out

    def find(name: str) -> str:
        for n in service.inventory.node_views(()):
            if name in (n.name, n.node_id):
                return n.node_id
        raise Problem(404, "Node not found", f"node {name!r} is not part of the cluster")

    @app.post("/v1/nodes/{name}/drain")
    def drain(name: Annotated[str, Depends(_path_node)], body: DrainIn, p: Who) -> NodeOut:
        """Stop placing new jobs on the node; its running jobs checkpoint and move elsewhere
        (the same drain a GPU fault triggers, recorded in the store)."""
        node_id = find(name)
        service.note_node(node_id)
        service.drain(node_id, body.reason)
        return next(n for n in nodes(p) if n.id == node_id)

    @app.post("/v1/nodes/{name}/undrain")
    def undrain(name: Annotated[str, Depends(_path_node)], p: Who) -> NodeOut:
        node_id = find(name)
        service.note_node(node_id)
        service.undrain(node_id)
        return next(n for n in nodes(p) if n.id == node_id)


def _register_usage(app: FastAPI, service: Service, Who) -> None:
    from scheduler.accounting import GROUP_KEYS, period_start, summarize

    store, clock = service.store, service.clock
    GroupKey = Literal[GROUP_KEYS]  # type: ignore[valid-type]

    @app.get("/v1/usage", responses={200: {"content": {"text/csv": {"schema": {"type": "string"}}},
                                          "description": "the report (JSON, or CSV with format=csv)"}})
    def usage(p: Who, since: Annotated[float | None, Query(ge=0, le=1e11, description="Unix time; default: start "
                                                             "of the current budget period")] = None,
              until: Annotated[float | None, Query(ge=0, le=1e11, description="Unix time; default: now")] = None,
              by: Annotated[list[GroupKey] | None, Query(description="group by (repeatable); default team")] = None,
              team: Annotated[str | None, Query(max_length=63)] = None,
              user: Annotated[str | None, Query(max_length=63)] = None,
              format: Literal["json", "csv"] = "json") -> UsageReport:
        """GPU-hours and $ by team / user / job / GPU model / node over a window, from the usage
        ledger (one record per job attempt; running attempts count up to `until`). Non-admins
        report on their own team only."""
        now = clock.now()
        until_ = now if until is None else until
        since_ = period_start(now, service.config.scheduler.budget_period) if since is None else since
        if since_ >= until_:
            raise Problem(422, "Invalid window", errors=[f"since: must be before until ({since_} >= {until_})"])
        if not p.is_admin:
            if team not in (None, p.team):
                raise Problem(403, "Forbidden", f"you belong to team {p.team!r}, not {team!r}")
            team = p.team
        keys = tuple(dict.fromkeys(by or ["team"]))
        rows = summarize(store.usage(since=since_, until=until_, team=team, user=user), keys, since_, until_)
        report = UsageReport(since=since_, until=until_, by=list(keys),
                             rows=[UsageGroupOut(key=r.key, gpu_hours=r.gpu_hours, cost_usd=r.cost_usd, jobs=r.jobs)
                                   for r in rows],
                             total_gpu_hours=sum(r.gpu_hours for r in rows), total_cost_usd=sum(r.cost_usd for r in rows))
        if format == "json":
            return report
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow([*keys, "gpu_hours", "cost_usd", "jobs"])
        for r in report.rows:
            w.writerow([*(r.key[k] for k in keys), f"{r.gpu_hours:.6f}", f"{r.cost_usd:.6f}", r.jobs])
        return Response(buf.getvalue(), media_type="text/csv")


# Path parameters with their patterns (FastAPI's Path() in a dependency keeps handlers short).
from fastapi import Path as _P  # noqa: E402


def _path_name(name: Annotated[str, _P(pattern=r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$", max_length=63)]) -> str:
    return name


def _path_user(name: Annotated[str, _P(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.@-]{0,62}$")]) -> str:
    return name


def _path_token(token_id: Annotated[str, _P(pattern=r"^[0-9a-f]{8}$")]) -> str:
    return token_id


def _path_node(name: Annotated[str, _P(min_length=1, max_length=255)]) -> str:
    return name


def openapi_document(app: FastAPI) -> str:
    return json.dumps(app.openapi(), indent=2, sort_keys=True) + "\n"


def offline_app() -> FastAPI:
    """An app over an empty in-memory cluster: for the OpenAPI document and schema tests."""
    import tempfile

    from scheduler.clock import WallClock
    from scheduler.executor import InMemoryExecutor
    from scheduler.inventory import Inventory
    from scheduler.store import Store

    clock = WallClock()
    service = Service(Store("sqlite://"), InMemoryExecutor(clock), Inventory(lambda: [], {}), ClusterConfig(),
                      clock, Path(tempfile.mkdtemp(prefix="shoal-openapi-")))
    return create_app(service, CollectorRegistry())


if __name__ == "__main__":  # python -m scheduler.api > docs/openapi.json
    print(openapi_document(offline_app()), end="")
