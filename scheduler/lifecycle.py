"""Job lifecycle: the states and the only transitions allowed between them.

    QUEUED -> ADMITTED -> STARTING -> RUNNING -> SUCCEEDED | FAILED | CANCELLED
    RUNNING -> PREEMPTING -> QUEUED         (stopped at a checkpoint; resumes from it)
    ADMITTED | STARTING | RUNNING -> QUEUED (lost: service restart, launch error, retryable failure)
    QUEUED <-> HELD -> CANCELLED            (a user's hold: never scheduled until released)

FAILED, SUCCEEDED and CANCELLED are terminal. A failure with retries left does not pass through
FAILED: the job goes straight back to QUEUED with the cause in the event's reason, so "FAILED"
always means "failed for good". STARTING may end directly (a job that finishes before its first
progress report was seen). Every transition is recorded in the event table by the store.
"""
from __future__ import annotations

from enum import Enum


class JobState(str, Enum):
    QUEUED = "QUEUED"
    HELD = "HELD"  # queued but held by a user or admin (`shoal hold`); not scheduled until released
    ADMITTED = "ADMITTED"  # placement decided and committed; not yet launched on Ray
    STARTING = "STARTING"  # launched on Ray; no progress seen yet
    RUNNING = "RUNNING"
    PREEMPTING = "PREEMPTING"  # asked to checkpoint and stop
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def active(self) -> bool:
        """Holds (or is about to hold) GPUs."""
        return self in ACTIVE


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
ACTIVE = frozenset({JobState.ADMITTED, JobState.STARTING, JobState.RUNNING, JobState.PREEMPTING})

_S = JobState
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    _S.QUEUED: frozenset({_S.ADMITTED, _S.CANCELLED, _S.HELD}),
    _S.HELD: frozenset({_S.QUEUED, _S.CANCELLED}),
    _S.ADMITTED: frozenset({_S.STARTING, _S.QUEUED, _S.FAILED, _S.CANCELLED}),
    _S.STARTING: frozenset({_S.RUNNING, _S.SUCCEEDED, _S.FAILED, _S.CANCELLED, _S.QUEUED, _S.PREEMPTING}),
    _S.RUNNING: frozenset({_S.SUCCEEDED, _S.FAILED, _S.CANCELLED, _S.QUEUED, _S.PREEMPTING}),
    _S.PREEMPTING: frozenset({_S.QUEUED, _S.SUCCEEDED, _S.FAILED, _S.CANCELLED}),
    _S.SUCCEEDED: frozenset(),
    _S.FAILED: frozenset(),
    _S.CANCELLED: frozenset(),
}


class IllegalTransition(ValueError):
    def __init__(self, job_id: int, src: JobState | None, dst: JobState):
        allowed = ", ".join(s.value for s in TRANSITIONS.get(src, ())) if src else "QUEUED"
        super().__init__(
            f"job {job_id}: illegal transition {src.value if src else None} -> {dst.value} "
            f"(allowed from {src.value if src else 'nothing'}: {allowed or 'none, it is terminal'})"
        )


def check_transition(job_id: int, src: JobState, dst: JobState) -> None:
    if dst not in TRANSITIONS[src]:
        raise IllegalTransition(job_id, src, dst)
