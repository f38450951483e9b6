"""Python SDK for the Shoal API; the CLI is built on it.

    from scheduler.client import Client
    c = Client()                      # SHOAL_URL, else the local daemon's URL from SHOAL_HOME
    job = c.submit_file("examples/tiny-lora.yaml")
    c.wait(job.id)
"""
from __future__ import annotations

import getpass
import json
import os
import time
from pathlib import Path
from typing import Iterator

import httpx

from scheduler.models import EventOut, JobOut, LogChunk
from scheduler.lifecycle import JobState
from scheduler.spec import JobSpec, load_job_spec


class ShoalError(RuntimeError):
    """An API error; `problems` lists each invalid field when the server named them."""

    def __init__(self, message: str, problems: list[str] | None = None, status: int | None = None):
        self.problems = problems or []
        self.status = status
        super().__init__(message + ("".join(f"\n  {p}" for p in self.problems)))


class NotRunning(ShoalError):
    pass


def discover_url(home: Path | None = None) -> str:
    if url := os.environ.get("SHOAL_URL"):
        return url.rstrip("/")
    from scheduler.daemon import default_home

    info = (home or default_home()) / "daemon.json"
    try:
        return json.loads(info.read_text())["url"]
    except (OSError, ValueError, KeyError):
        raise NotRunning(f"no Shoal server found: {info} is missing (run `shoal up`, or set SHOAL_URL)") from None


class Client:
    def __init__(self, url: str | None = None, timeout: float = 30.0):
        self.url = url or discover_url()
        self._http = httpx.Client(base_url=self.url, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, path: str, **kw) -> object:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.ConnectError:
            raise NotRunning(f"cannot reach the Shoal server at {self.url} (is `shoal up` running?)") from None
        if r.status_code >= 400:
            try:
                body = r.json()
            except ValueError:
                body = {"title": r.text}
            raise ShoalError(f"{body.get('title', 'error')}" + (f": {body['detail']}" if body.get("detail") else ""),
                             body.get("errors"), r.status_code)
        return r.json()

    def health(self) -> bool:
        try:
            return self._http.get("/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def submit(self, spec: JobSpec | dict, source: str | None = None) -> JobOut:
        """Submit a spec (paths must be absolute). Without a `user`, the login name is used."""
        data = spec.model_dump(mode="json", exclude_unset=True) if isinstance(spec, JobSpec) else dict(spec)
        data.setdefault("user", getpass.getuser())
        return JobOut.model_validate(self._call("POST", "/v1/jobs", json={"spec": data, "source": source}))

    def submit_file(self, path: str | Path) -> JobOut:
        """Reads and checks the spec locally first (errors name file lines), then submits it."""
        return self.submit(load_job_spec(path), source=str(path))

    def jobs(self, state: list[str] | None = None, team: str | None = None) -> list[JobOut]:
        params = {"state": state or [], **({"team": team} if team else {})}
        return [JobOut.model_validate(j) for j in self._call("GET", "/v1/jobs", params=params)]

    def job(self, job_id: int) -> JobOut:
        return JobOut.model_validate(self._call("GET", f"/v1/jobs/{job_id}"))

    def cancel(self, job_id: int) -> JobOut:
        return JobOut.model_validate(self._call("POST", f"/v1/jobs/{job_id}/cancel"))

    def events(self, job_id: int) -> list[EventOut]:
        return [EventOut.model_validate(e) for e in self._call("GET", f"/v1/jobs/{job_id}/events")]

    def logs(self, job_id: int, offset: int = 0) -> LogChunk:
        return LogChunk.model_validate(self._call("GET", f"/v1/jobs/{job_id}/logs", params={"offset": offset}))

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
