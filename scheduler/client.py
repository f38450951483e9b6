"""Python SDK for the Shoal API; the CLI is built on it.

    from scheduler.client import Client
    c = Client()                      # server URL and token found as below
    job = c.submit_file("examples/tiny-lora.yaml")
    c.wait(job.id)

Where the server and the token come from (first found wins):
  URL    the `url` argument; SHOAL_URL; `url:` in the config file; the local server's
         $SHOAL_HOME/daemon.json
  token  the `token` argument; SHOAL_TOKEN; `token:` in the config file; the local server's admin
         token $SHOAL_HOME/admin.token (written by `shoal up`, readable by its owner only)
The config file is $SHOAL_CONFIG, else ~/.config/shoal/config.yaml ($XDG_CONFIG_HOME), else
$SHOAL_HOME/config.yaml:  `url: http://host:8470` and `token: shoal_...`.
"""
from __future__ import annotations

import getpass
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import httpx
import yaml
from pydantic import ValidationError

from scheduler.lifecycle import JobState
from scheduler.models import (
    CohortOut, DryRunOut, EventOut, JobOut, JobPage, LogChunk, MetricsSummary, NodeOut, QueueEntry, Role, TeamOut,
    TokenCreated, TokenOut, UsageReport, UserOut, WhoAmI,
)
from scheduler.spec import JobSpec, SpecError, _parse_yaml, format_validation_error


class ShoalError(RuntimeError):
    """An API error; `problems` lists each invalid field when the server named them."""

    def __init__(self, message: str, problems: list[str] | None = None, status: int | None = None):
        self.problems = problems or []
        self.status = status
        super().__init__(message + ("".join(f"\n  {p}" for p in self.problems)))


class NotRunning(ShoalError):
    pass


def _home() -> Path:
    from scheduler.daemon import default_home

    return default_home()


def config_file() -> Path | None:
    if env := os.environ.get("SHOAL_CONFIG"):
        return Path(env).expanduser()
    xdg = Path(os.environ.get("XDG_CONFIG_HOME") or "~/.config").expanduser() / "shoal" / "config.yaml"
    for p in (xdg, _home() / "config.yaml"):
        if p.is_file():
            return p
    return None


def _file_settings() -> dict[str, str]:
    p = config_file()
    if p is None:
        return {}
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ShoalError(f"cannot read the Shoal config file {p}: {e}") from None
    if not isinstance(data, dict) or set(data) - {"url", "token"}:
        raise ShoalError(f"{p}: expected a mapping with keys url and token only, got {data!r:.200}")
    return {k: str(v) for k, v in data.items() if v is not None}


def discover_url(home: Path | None = None) -> str:
    if url := os.environ.get("SHOAL_URL"):
        return url.rstrip("/")
    if url := _file_settings().get("url"):
        return url.rstrip("/")
    info = (home or _home()) / "daemon.json"
    try:
        return json.loads(info.read_text())["url"]
    except (OSError, ValueError, KeyError):
        raise NotRunning(f"no Shoal server found: {info} is missing (run `shoal up`, or set SHOAL_URL)") from None


def discover_token(home: Path | None = None) -> str | None:
    if token := os.environ.get("SHOAL_TOKEN"):
        return token.strip()
    if token := _file_settings().get("token"):
        return token.strip()
    try:
        return ((home or _home()) / "admin.token").read_text().strip() or None
    except OSError:
        return None


def load_job_spec_with(path: str | Path, overrides: list[str] = ()) -> JobSpec:
    """Read a spec file and apply `--set key.path=value` overrides (values parsed as YAML, so
    `8` is a number and `true` a boolean) before validating. Errors name the file line, or the
    override, of each invalid field."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise SpecError([f"{p}: cannot read: {e.strerror}"]) from None
    data = _parse_yaml(text, str(p))
    if not isinstance(data, dict):
        raise SpecError([f"{p}:1: expected a mapping of fields, got {type(data).__name__}"])
    applied: dict[str, str] = {}
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"--set {item}: expected key.path=value")
            continue
        target: Any = data
        *parents, leaf = key.split(".")
        for i, part in enumerate(parents):
            nxt = target.setdefault(part, {}) if isinstance(target, dict) else None
            if not isinstance(nxt, dict):
                problems.append(f"--set {item}: {'.'.join(parents[:i + 1])} is not a mapping")
                break
            target = nxt
        else:
            try:
                target[leaf] = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError:
                target[leaf] = raw
            applied[key] = item
    if problems:
        raise SpecError(problems)
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as e:
        lines = format_validation_error(e, str(p), text)
        out = []
        for line, err in zip(lines, _fields(e)):
            hit = next((k for k in applied if err == k or err.startswith(k + ".")), None)
            out.append(f"--set {applied[hit]}: {line.split(': ', 1)[1] if hit else line}" if hit else line)
        raise SpecError(out) from None
    return spec.with_resolved_paths(p.resolve().parent)


def _fields(e: ValidationError) -> list[str]:
    """The field paths of `format_validation_error`'s lines, in the same order."""
    from scheduler.spec import _UNION_TAG

    seen: list[str] = []
    for err in e.errors():
        loc = tuple(x for x in err["loc"] if not (isinstance(x, str) and _UNION_TAG.match(x)))
        f = ".".join(str(x) for x in loc) or "(spec)"
        if f not in seen:
            seen.append(f)
    return seen


class Client:
    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 30.0,
                 retries: int = 3):
        self.url = url or discover_url()
        self.token = token if token is not None else discover_token()
        self.retries = retries
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, path: str, *, retry: bool = False, **kw) -> Any:
        """One API call. `retry`: the call is safe to repeat (a read, or a submit with an
        idempotency key), so transport errors are retried with backoff."""
        attempts = self.retries if retry else 1
        for i in range(attempts):
            try:
                r = self._http.request(method, path, **kw)
                break
            except httpx.ConnectError:
                if i + 1 == attempts:
                    raise NotRunning(f"cannot reach the Shoal server at {self.url} (is `shoal up` running?)") from None
            except httpx.TransportError as e:
                if i + 1 == attempts:
                    raise ShoalError(f"request to {self.url}{path} failed: {e!r}") from None
            time.sleep(0.2 * 2**i)
        if r.status_code >= 400:
            try:
                body = r.json()
            except ValueError:
                body = {"title": r.text}
            raise ShoalError(f"{body.get('title', 'error')}" + (f": {body['detail']}" if body.get("detail") else ""),
                             body.get("errors"), r.status_code)
        if r.status_code == 204:
            return None
        if r.headers.get("content-type", "").startswith("text/"):
            return r.text
        return r.json()

    def health(self) -> bool:
        try:
            return self._http.get("/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def whoami(self) -> WhoAmI:
        return WhoAmI.model_validate(self._call("GET", "/v1/whoami", retry=True))

    # -- jobs ------------------------------------------------------------------------------------
    @staticmethod
    def _body(spec: JobSpec | dict, source: str | None) -> dict:
        data = spec.model_dump(mode="json", exclude_unset=True) if isinstance(spec, JobSpec) else dict(spec)
        return {"spec": data, "source": source}

    def submit(self, spec: JobSpec | dict, source: str | None = None, idempotency_key: str | None = None) -> JobOut:
        """Submit a spec (paths must be absolute). The server runs the job as the token's user.
        Each call carries an idempotency key (a new one unless given), so a retry after a lost
        answer never queues the job twice."""
        key = idempotency_key or str(uuid.uuid4())
        return JobOut.model_validate(self._call("POST", "/v1/jobs", json=self._body(spec, source),
                                                headers={"Idempotency-Key": key}, retry=True))

    def dry_run(self, spec: JobSpec | dict, source: str | None = None) -> DryRunOut:
        return DryRunOut.model_validate(self._call("POST", "/v1/jobs/dry-run", json=self._body(spec, source),
                                                   retry=True))

    def submit_file(self, path: str | Path, overrides: list[str] = (), dry_run: bool = False) -> JobOut | DryRunOut:
        """Reads and checks the spec locally first (errors name file lines), then submits it."""
        spec = load_job_spec_with(path, overrides)
        return self.dry_run(spec, str(path)) if dry_run else self.submit(spec, source=str(path))

    def jobs_page(self, *, state: list[str] | None = None, team: str | None = None, user: str | None = None,
                  since: float | None = None, cursor: str | None = None, offset: int = 0,
                  limit: int = 100) -> JobPage:
        params: dict[str, Any] = {"state": state or [], "offset": offset, "limit": limit}
        params.update({k: v for k, v in {"team": team, "user": user, "since": since, "cursor": cursor}.items()
                       if v is not None})
        return JobPage.model_validate(self._call("GET", "/v1/jobs", params=params, retry=True))

    def jobs(self, state: list[str] | None = None, team: str | None = None, user: str | None = None,
             since: float | None = None, limit: int | None = None) -> list[JobOut]:
        """Every matching job (following pages), oldest first; at most `limit`."""
        out: list[JobOut] = []
        cursor = None
        while True:
            page = self.jobs_page(state=state, team=team, user=user, since=since, cursor=cursor,
                                  limit=min(1000, limit - len(out)) if limit else 1000)
            out += page.items
            cursor = page.next_cursor
            if cursor is None or (limit and len(out) >= limit):
                return out

    def job(self, job_id: int) -> JobOut:
        return JobOut.model_validate(self._call("GET", f"/v1/jobs/{job_id}", retry=True))

    def _act(self, job_id: int, verb: str) -> JobOut:
        return JobOut.model_validate(self._call("POST", f"/v1/jobs/{job_id}/{verb}"))

    def cancel(self, job_id: int) -> JobOut:
        return self._act(job_id, "cancel")

    def hold(self, job_id: int) -> JobOut:
        return self._act(job_id, "hold")

    def release(self, job_id: int) -> JobOut:
        return self._act(job_id, "release")

    def requeue(self, job_id: int) -> JobOut:
        return self._act(job_id, "requeue")

    def events(self, job_id: int) -> list[EventOut]:
        return [EventOut.model_validate(e) for e in self._call("GET", f"/v1/jobs/{job_id}/events", retry=True)]

    def logs(self, job_id: int, offset: int = 0) -> LogChunk:
        return LogChunk.model_validate(self._call("GET", f"/v1/jobs/{job_id}/logs", params={"offset": offset},
                                                  retry=True))

    def follow_logs(self, job_id: int, poll_s: float = 0.5) -> Iterator[str]:
        """Yields log text until the job is finished and every line has been read."""
        offset = 0
        while True:
            chunk = self.logs(job_id, offset)
            offset = chunk.offset
            if chunk.text:
                yield chunk.text
            elif chunk.terminal:
                return
            else:
                time.sleep(poll_s)

    def wait(self, job_id: int, timeout: float | None = None, poll_s: float = 0.5) -> JobOut:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job.state in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED):
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.state.value} after {timeout} s")
            time.sleep(poll_s)

    def queue(self, team: str | None = None) -> list[QueueEntry]:
        params = {"team": team} if team else {}
        return [QueueEntry.model_validate(e) for e in self._call("GET", "/v1/queue", params=params, retry=True)]

    def metrics_summary(self) -> MetricsSummary:
        return MetricsSummary.model_validate(self._call("GET", "/v1/metrics/summary", retry=True))

    # -- teams, cohorts, users, tokens -------------------------------------------------------------
    def teams(self) -> list[TeamOut]:
        return [TeamOut.model_validate(t) for t in self._call("GET", "/v1/teams", retry=True)]

    def team(self, name: str) -> TeamOut:
        return TeamOut.model_validate(self._call("GET", f"/v1/teams/{name}", retry=True))

    def put_team(self, name: str, **fields: Any) -> TeamOut:
        return TeamOut.model_validate(self._call("PUT", f"/v1/teams/{name}", json=fields))

    def patch_team(self, name: str, **fields: Any) -> TeamOut:
        return TeamOut.model_validate(self._call("PATCH", f"/v1/teams/{name}", json=fields))

    def delete_team(self, name: str) -> None:
        self._call("DELETE", f"/v1/teams/{name}")

    def cohorts(self) -> list[CohortOut]:
        return [CohortOut.model_validate(c) for c in self._call("GET", "/v1/cohorts", retry=True)]

    def put_cohort(self, name: str, parent: str | None = None) -> CohortOut:
        return CohortOut.model_validate(self._call("PUT", f"/v1/cohorts/{name}", json={"parent": parent}))

    def delete_cohort(self, name: str) -> None:
        self._call("DELETE", f"/v1/cohorts/{name}")

    def users(self) -> list[UserOut]:
        return [UserOut.model_validate(u) for u in self._call("GET", "/v1/users", retry=True)]

    def put_user(self, name: str, team: str | None, role: Role | str) -> UserOut:
        return UserOut.model_validate(self._call("PUT", f"/v1/users/{name}",
                                                 json={"team": team, "role": Role(role).value}))

    def delete_user(self, name: str) -> None:
        self._call("DELETE", f"/v1/users/{name}")

    def create_token(self, user: str, team: str | None, role: Role | str = Role.member,
                     expires_in_s: float | None = 90 * 86400.0, description: str = "") -> TokenCreated:
        body = {"user": user, "team": team, "role": Role(role).value, "expires_in_s": expires_in_s,
                "description": description}
        return TokenCreated.model_validate(self._call("POST", "/v1/tokens", json=body))

    def tokens(self) -> list[TokenOut]:
        return [TokenOut.model_validate(t) for t in self._call("GET", "/v1/tokens", retry=True)]

    def revoke_token(self, token_id: str) -> TokenOut:
        return TokenOut.model_validate(self._call("DELETE", f"/v1/tokens/{token_id}"))

    # -- cluster and usage -------------------------------------------------------------------------
    def nodes(self) -> list[NodeOut]:
        return [NodeOut.model_validate(n) for n in self._call("GET", "/v1/nodes", retry=True)]

    def drain(self, node: str, reason: str = "drained by admin") -> NodeOut:
        return NodeOut.model_validate(self._call("POST", f"/v1/nodes/{node}/drain", json={"reason": reason}))

    def undrain(self, node: str) -> NodeOut:
        return NodeOut.model_validate(self._call("POST", f"/v1/nodes/{node}/undrain"))

    def usage(self, *, since: float | None = None, until: float | None = None, by: list[str] = ("team",),
              team: str | None = None, user: str | None = None) -> UsageReport:
        params: dict[str, Any] = {"by": list(by), "format": "json"}
        params.update({k: v for k, v in {"since": since, "until": until, "team": team, "user": user}.items()
                       if v is not None})
        return UsageReport.model_validate(self._call("GET", "/v1/usage", params=params, retry=True))

    def usage_csv(self, *, by: list[str] = ("team",), **kw: Any) -> str:
        params: dict[str, Any] = {"format": "csv", "by": list(by), **{k: v for k, v in kw.items() if v is not None}}
        return self._call("GET", "/v1/usage", params=params, retry=True)


def default_user() -> str:
    return getpass.getuser()
