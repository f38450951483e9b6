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
import hashlib
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable

from fastapi import Depends, FastAPI, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from monitoring.exposition import render
from scheduler.auth import ADMINS, ALL_ROLES, WRITERS, AuthError, Principal, TokenAuthority
from scheduler.models import JobOut, Role, WhoAmI
from scheduler.service import Service
from scheduler.spec import ClusterConfig
from scheduler.store import UnknownJob

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
    if not request.scope.get("query_string"):  # most calls (every submit) carry none
        return
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
    N transactions into one; alone, a request waits for nobody.

    Under concurrency (the last batch held more than one submission) the writer first lingers
    `linger_s` for more to arrive, as PostgreSQL's `commit_delay` does: a transaction costs
    ~0.4 ms of CPU plus ~0.06 ms per job (SQLite, this machine), so batches of 1-2 spent a fifth
    of the server's CPU per submit on transaction overhead; a few ms of latency buy larger ones."""

    def __init__(self, store, max_batch: int = 256, on_created=None, linger_s: float = 0.004):
        import queue

        self.store, self.max_batch, self.on_created = store, max_batch, on_created
        self.linger_s, self._crowded = linger_s, False
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
            if self._crowded and self.linger_s > 0:
                time.sleep(self.linger_s)
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._q.get_nowait())
                except self._empty:
                    break
            self._crowded = len(batch) > 1
            try:
                results = self.store.submit_many([item for item, _ in batch])
            except Exception as e:  # noqa: BLE001 - each waiting request gets the error
                for _, fut in batch:
                    fut.set_exception(e)
                continue
            if self.on_created is not None:  # the scheduler loop need not read them back
                self.on_created([r[0] for r in results if isinstance(r, tuple) and r[1]])
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

    # -- the routes, by area (scheduler/routes/) -------------------------------------------------
    from scheduler.routes import jobs, nodes, tenancy, usage

    teams_now, team_out, live_jobs = jobs.register(app, service, Who, visible_job, own_team)
    tenancy.register(app, service, auth, Who, teams_now, team_out, live_jobs)
    nodes.register(app, service, Who)
    usage.register(app, service, Who)

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
