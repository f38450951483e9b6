"""The API's request and response bodies. Shared by the server (scheduler/api.py) and the SDK
(scheduler/client.py); needs only pydantic, so the SDK and CLI do not import the server's stack."""
from __future__ import annotations

from dataclasses import asdict
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from scheduler.lifecycle import JobState


class SubmitIn(BaseModel):
    spec: dict[str, Any]
    source: str | None = Field(default=None, max_length=4096)  # the spec's file name, for messages


class JobOut(BaseModel):
    id: int
    name: str
    team: str
    user: str
    priority: int
    state: JobState
    gpus: int
    memory_per_gpu_mib: int
    submitted_at: float
    started_at: float | None
    finished_at: float | None
    attempt: int
    retries: int
    placement: dict | None
    pending_reason: str | None
    estimated_start_at: float | None = None  # the scheduler's estimate while queued (backfill reservation)
    progress: dict | None
    result: dict | None
    failure_reason: str | None
    cancel_requested: bool
    spec: dict

    @classmethod
    def of(cls, job) -> JobOut:
        """From a store JobRecord."""
        return cls.model_validate({k: v for k, v in asdict(job).items() if k in cls.model_fields})


class EventOut(BaseModel):
    ts: float
    from_state: str | None
    to_state: str
    attempt: int
    reason: str


class LogChunk(BaseModel):
    text: str
    offset: int  # byte offset to ask for next
    terminal: bool  # the job is finished: no more lines will come


# -- issue #7: tenancy, queue, cluster ------------------------------------------------------------

class Role(str, Enum):
    admin = "admin"  # cluster admin
    team_admin = "team-admin"  # a member who also sets their team's lending/borrowing limits
    member = "member"  # submits and manages their team's jobs
    viewer = "viewer"  # reads their team's jobs, quota and usage


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # `false` is not 0, "1" is not 1


_NAME = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$"
_USER = r"^[A-Za-z0-9_][A-Za-z0-9_.@-]{0,62}$"


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last page")


class DryRunOut(BaseModel):
    """What submitting would do, without queuing anything."""
    valid: bool
    problems: list[str] = []  # every reason the job would be refused
    gpus: int | None = None  # resolved GPU count ('auto' decided by the estimator)
    memory_per_gpu_mib: int | None = None
    train_records: int | None = None
    validation_records: int | None = None
    would_start_now: bool = False
    pending_reason: str | None = None  # why it would wait, as the scheduler sees the cluster now
    estimated_start_at: float | None = None  # Unix time; null when unknown


class QueueEntry(BaseModel):
    position: int  # 1 = next to start
    id: int
    name: str
    team: str
    user: str
    priority: int
    state: str
    gpus: int
    submitted_at: float
    pending_reason: str | None
    estimated_start_at: float | None  # Unix time (like `squeue --start`); null when unknown


class TeamOut(BaseModel):
    name: str
    gpus: int
    gpus_by_model: dict[str, int]
    cohort: str | None
    borrowing_limit: int | None
    lending_limit: int | None
    weight: float
    budget_usd: float | None
    gpus_in_use: int = 0  # GPUs its active jobs hold now
    gpus_queued: int = 0  # GPUs its queued jobs ask for
    jobs_running: int = 0
    jobs_queued: int = 0


class TeamIn(_In):
    """A team's quota, cohort and budget (PUT creates or replaces; PATCH changes the given fields)."""
    gpus: int = Field(ge=0, le=100_000)
    gpus_by_model: dict[str, int] = {}
    cohort: str | None = Field(default=None, pattern=_NAME, max_length=63)
    borrowing_limit: int | None = Field(default=None, ge=0, le=100_000)
    lending_limit: int | None = Field(default=None, ge=0, le=100_000)
    weight: float = Field(default=1.0, gt=0, le=1e6)
    budget_usd: float | None = Field(default=None, ge=0, le=1e12)


class TeamPatch(_In):
    gpus: int | None = Field(default=None, ge=0, le=100_000)
    gpus_by_model: dict[str, int] | None = None
    cohort: str | None = Field(default=None, pattern=_NAME, max_length=63)
    borrowing_limit: int | None = Field(default=None, ge=0, le=100_000)
    lending_limit: int | None = Field(default=None, ge=0, le=100_000)
    weight: float | None = Field(default=None, gt=0, le=1e6)
    budget_usd: float | None = Field(default=None, ge=0, le=1e12)


class CohortOut(BaseModel):
    name: str
    parent: str | None
    teams: list[str]


class CohortIn(_In):
    parent: str | None = Field(default=None, pattern=_NAME, max_length=63)


class UserOut(BaseModel):
    name: str
    team: str | None
    role: str
    created_at: float


class UserIn(_In):
    team: str | None = Field(default=None, pattern=_NAME, max_length=63)
    role: Role = Field(strict=False)


class TokenCreateIn(_In):
    user: str = Field(pattern=_USER)
    team: str | None = Field(default=None, pattern=_NAME, max_length=63, description="required unless role is admin")
    role: Role = Field(default=Role.member, strict=False)
    expires_in_s: float | None = Field(default=90 * 86400.0, gt=0, le=10 * 365 * 86400.0,
                                       description="lifetime; null = never expires")
    description: str = Field(default="", max_length=200)


class TokenOut(BaseModel):
    id: str
    user: str
    description: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None


class TokenCreated(TokenOut):
    token: str  # shown once; only a keyed hash is stored
    team: str | None
    role: Role = Field(strict=False)


class WhoAmI(BaseModel):
    user: str
    team: str | None
    role: Role = Field(strict=False)
    token_id: str


class GpuOut(BaseModel):
    index: int
    model: str
    memory_total_mib: int
    memory_used_mib: int
    reserved_mib: int
    utilization: float  # 0..1, live
    healthy: bool
    jobs: list[int]  # Shoal jobs placed on it (other teams' jobs are hidden from non-admins)
    hidden_jobs: int = 0  # jobs of other teams on it


class NodeOut(BaseModel):
    id: str
    name: str
    schedulable: bool
    drained: bool
    drain_reason: str | None
    lost: bool = False  # the node died (Ray reports it dead or it stopped answering); a returning node is new
    cpus: int | None
    cpus_held: int
    gpus: list[GpuOut]


class DrainIn(_In):
    reason: str = Field(default="drained by admin", max_length=500)


class MetricsSummary(BaseModel):
    jobs_by_state: dict[str, int]  # the caller's visible jobs
    gpus_total: int
    gpus_healthy: int
    gpus_allocated: int  # held by any Shoal job
    gpu_utilization_mean: float  # live, 0..1
    memory_used_mib: int
    memory_total_mib: int
    teams: list[TeamOut]


class UsageGroupOut(BaseModel):
    key: dict[str, str]  # the grouping's values, e.g. {"team": "a", "user": "bob"}
    gpu_hours: float
    cost_usd: float
    jobs: int


class UsageReport(BaseModel):
    """GPU-hours and cost from the usage ledger over [since, until] (Unix times), like sreport."""
    since: float
    until: float
    by: list[str]
    rows: list[UsageGroupOut]
    total_gpu_hours: float
    total_cost_usd: float


ReportFormat = Literal["json", "csv"]
