"""The API's request and response bodies. Shared by the server (scheduler/api.py) and the SDK
(scheduler/client.py); needs only pydantic, so the SDK and CLI do not import the server's stack."""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

from pydantic import BaseModel

from scheduler.lifecycle import JobState


class SubmitIn(BaseModel):
    spec: dict[str, Any]
    source: str | None = None  # the spec's file name, for messages


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
