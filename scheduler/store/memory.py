"""MemoryStore: the Store interface (scheduler/store/db.py) held in process memory.

For the simulator (tens of thousands of jobs replayed through the real service loop, where a
SQL round trip per transition would dominate) and for tests. Same semantics as the SQL store:
every state change is a compare-and-set on the current state that follows the lifecycle table
and appends its event atomically (one lock), unknown jobs raise UnknownJob, only the mutable
fields may change. Nothing survives the process. tests/unit/test_store.py runs the same tests
against both implementations.

Records are immutable (frozen dataclasses); the dict fields of a returned record (spec,
placement, progress, result) are the store's own copies: read them, do not mutate them.
Queries by state use per-state indexes, so the service's per-cycle reads cost O(jobs returned),
not O(all jobs ever submitted).
"""
from __future__ import annotations

import threading
from typing import Any, Iterable

from scheduler.lifecycle import ACTIVE, JobState, check_transition
from scheduler.store.db import _MUTABLE, Conflict, EventRecord, JobRecord, UnknownJob

_DICT_FIELDS = ("placement", "progress", "result")


def _copy(v: Any) -> Any:
    """Copy of a JSON-like value (dicts and lists copied, scalars shared); faster than deepcopy."""
    if type(v) is dict:
        return {k: _copy(x) for k, x in v.items()}
    if type(v) is list or type(v) is tuple:
        return [_copy(x) for x in v]  # as JSON would store it
    return v


def _with(rec: JobRecord, **changes: Any) -> JobRecord:
    """`dataclasses.replace` without re-running __init__ (10x faster; fields were validated)."""
    new = object.__new__(JobRecord)
    d = new.__dict__
    d.update(rec.__dict__)
    d.update(changes)
    return new


class MemoryStore:
    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._lock = threading.Lock()
        self._jobs: dict[int, JobRecord] = {}
        self._events: dict[int, list[EventRecord]] = {}
        self._by_state: dict[JobState, dict[int, None]] = {s: {} for s in JobState}  # id sets
        self._cancel: set[int] = set()  # ids with cancel_requested, not terminal
        self._next_id = 1

    def close(self) -> None:
        pass

    # -- writes -----------------------------------------------------------------------------

    def submit(self, *, spec: dict, name: str, team: str, user: str, priority: int, gpus: int,
               memory_per_gpu_mib: int, now: float, reason: str = "submitted") -> JobRecord:
        with self._lock:
            job_id = self._next_id
            self._next_id += 1
            rec = JobRecord(
                id=job_id, name=name, team=team, user=user, priority=priority, state=JobState.QUEUED,
                spec=_copy(spec), gpus=gpus, memory_per_gpu_mib=memory_per_gpu_mib, submitted_at=now,
                updated_at=now, started_at=None, finished_at=None, attempt=0, retries=0, placement=None,
                pending_reason=None, progress=None, result=None, failure_reason=None, cancel_requested=False,
                last_checkpoint_step=None, last_checkpoint_at=None, attempt_started_at=None, attained_gpu_s=0.0,
            )
            self._jobs[job_id] = rec
            self._by_state[JobState.QUEUED][job_id] = None
            self._events[job_id] = [EventRecord(job_id, now, None, JobState.QUEUED.value, 0, reason)]
            return rec

    @staticmethod
    def _check_fields(changes: dict[str, Any]) -> dict[str, Any]:
        bad = set(changes) - _MUTABLE
        if bad:
            raise ValueError(f"not a mutable job field: {sorted(bad)}")
        return {k: (_copy(v) if k in _DICT_FIELDS and v is not None else v) for k, v in changes.items()}

    def transition(self, job_id: int, src: JobState | Iterable[JobState], dst: JobState, *,
                   reason: str, now: float, **changes: Any) -> JobRecord:
        """As Store.transition: move `job_id` from `src` to `dst`, apply `changes` and append the
        event atomically; IllegalTransition / Conflict / UnknownJob as there."""
        sources = {src} if isinstance(src, JobState) else set(src)
        changes = self._check_fields(changes)
        with self._lock:
            rec = self._jobs.get(job_id)
            if rec is None:
                raise UnknownJob(job_id)
            cur = rec.state
            if cur not in sources:
                raise Conflict(f"job {job_id} is {cur.value}, expected {'/'.join(x.value for x in sources)}")
            check_transition(job_id, cur, dst)
            new = _with(rec, state=dst, updated_at=now, **changes)
            self._jobs[job_id] = new
            del self._by_state[cur][job_id]
            self._by_state[dst][job_id] = None
            self._index_cancel(new)
            self._events[job_id].append(EventRecord(job_id, now, cur.value, dst.value,
                                                    changes.get("attempt", rec.attempt), reason))
            return new

    def _index_cancel(self, rec: JobRecord) -> None:
        if rec.cancel_requested and not rec.state.terminal:
            self._cancel.add(rec.id)
        else:
            self._cancel.discard(rec.id)

    def update_fields(self, job_id: int, **changes: Any) -> None:
        """Change non-state fields. No event is written."""
        changes = self._check_fields(changes)
        with self._lock:
            rec = self._jobs.get(job_id)
            if rec is None:
                raise UnknownJob(job_id)
            new = _with(rec, **changes)
            self._jobs[job_id] = new
            self._index_cancel(new)

    def request_cancel(self, job_id: int) -> JobRecord:
        with self._lock:
            rec = self._jobs.get(job_id)
            if rec is None:
                raise UnknownJob(job_id)
            new = _with(rec, cancel_requested=True)
            self._jobs[job_id] = new
            self._index_cancel(new)
            return new

    # -- reads ------------------------------------------------------------------------------

    def get(self, job_id: int) -> JobRecord:
        rec = self._jobs.get(job_id)
        if rec is None:
            raise UnknownJob(job_id)
        return rec

    def jobs(self, *, states: Iterable[JobState] | None = None, team: str | None = None,
             limit: int | None = None, cancel_requested: bool | None = None) -> list[JobRecord]:
        with self._lock:
            if cancel_requested:
                ids: Iterable[int] = self._cancel_ids(states)
            elif states is None:
                ids = self._jobs.keys()
            else:
                wanted = list(dict.fromkeys(states))
                ids = sorted(i for s in wanted for i in self._by_state[s])
            out = []
            for i in ids:
                rec = self._jobs[i]
                if team is not None and rec.team != team:
                    continue
                if cancel_requested is not None and rec.cancel_requested != cancel_requested:
                    continue
                out.append(rec)
                if limit is not None and len(out) >= limit:
                    break
            return out

    def _cancel_ids(self, states: Iterable[JobState] | None) -> list[int]:
        if states is None:  # terminal jobs with the flag are not indexed: scan (rare query)
            return [i for i, r in self._jobs.items() if r.cancel_requested]
        wanted = set(states)
        if any(s.terminal for s in wanted):
            return [i for i, r in self._jobs.items() if r.cancel_requested and r.state in wanted]
        return sorted(i for i in self._cancel if self._jobs[i].state in wanted)

    def active_jobs(self) -> list[JobRecord]:
        return self.jobs(states=ACTIVE)

    def events(self, job_id: int) -> list[EventRecord]:
        with self._lock:
            if job_id not in self._jobs:
                raise UnknownJob(job_id)
            return list(self._events[job_id])

    def count_by_state_team(self) -> dict[tuple[str, str], int]:
        with self._lock:
            out: dict[tuple[str, str], int] = {}
            for rec in self._jobs.values():
                key = (rec.state.value, rec.team)
                out[key] = out.get(key, 0) + 1
            return out
