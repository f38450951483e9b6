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

import bisect
import math
import threading
from typing import Any, Iterable

from scheduler.accounting import UsageRecord
from scheduler.copying import with_fields as _with
from scheduler.lifecycle import ACTIVE, JobState, check_transition
from scheduler.store.db import _MUTABLE, Conflict, EventRecord, JobRecord, NodeRecord, UnknownJob

_DICT_FIELDS = ("placement", "progress", "result")


_SCALARS = frozenset({str, int, float, bool, type(None)})


def _copy(v: Any) -> Any:
    """Copy of a JSON-like value (dicts and lists copied, scalars shared); faster than deepcopy.
    A scalar inside is taken as it is without a call (most values of a record's dicts are)."""
    if type(v) is dict:
        return {k: x if type(x) in _SCALARS else _copy(x) for k, x in v.items()}
    if type(v) is list or type(v) is tuple:
        return [x if type(x) in _SCALARS else _copy(x) for x in v]  # as JSON would store it
    return v


class MemoryStore:
    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._lock = threading.Lock()
        self._jobs: dict[int, JobRecord] = {}
        self._events: dict[int, list[EventRecord]] = {}
        self._by_state: dict[JobState, dict[int, None]] = {s: {} for s in JobState}  # id sets
        self._cancel: set[int] = set()  # ids with cancel_requested, not terminal
        self._next_id = 1
        self._usage: list[UsageRecord] = []  # the usage ledger, one record per attempt
        self._open_usage: dict[int, int] = {}  # job id -> index of its open ledger record
        # closed ledger records in the order they closed: (ended_at, index); sorted while the clock
        # never goes back, so "closed after t" is a bisect (the simulator asks every refresh)
        self._closed: list[tuple[float, int]] = []
        self._closed_sorted = True
        # open records' start times rise in _open_usage's (insertion) order, so the ones opened
        # since a time are a suffix of it (usage(opened_since=...)); False once a writer's clock
        # went back
        self._opened_in_order = True
        self._last_opened_at = -math.inf
        self._nodes: dict[str, NodeRecord] = {}
        # queued_versions kept as records change (the service reads it every cycle): id -> version
        # of each QUEUED job not being cancelled, in id order once `_qver_sorted` (a requeued job
        # is re-inserted at the end; the next read restores id order)
        self._qver: dict[int, tuple] = {}
        self._qver_last = 0
        self._qver_sorted = True
        self._log: list[int] = []  # job ids in the order their records were written (changes_since)

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
            self._log.append(job_id)
            self._by_state[JobState.QUEUED][job_id] = None
            self._index_queued(rec)
            self._events[job_id] = [EventRecord(job_id, now, None, JobState.QUEUED.value, 0, reason)]
            return rec

    @staticmethod
    def _check_fields(changes: dict[str, Any]) -> dict[str, Any]:
        bad = set(changes) - _MUTABLE
        if bad:
            raise ValueError(f"not a mutable job field: {sorted(bad)}")
        return {k: (_copy(v) if k in _DICT_FIELDS and v is not None else v) for k, v in changes.items()}

    def transition(self, job_id: int, src: JobState | Iterable[JobState], dst: JobState, *,
                   reason: str, now: float, usage: dict | None = None, **changes: Any) -> JobRecord:
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
            self._log.append(job_id)
            del self._by_state[cur][job_id]
            self._by_state[dst][job_id] = None
            self._index_cancel(new)
            self._index_queued(new)
            self._events[job_id].append(EventRecord(job_id, now, cur.value, dst.value,
                                                    changes.get("attempt", rec.attempt), reason))
            if cur.active and not dst.active and (i := self._open_usage.pop(job_id, None)) is not None:
                u = self._usage[i]
                self._usage[i] = UsageRecord(u.job_id, u.attempt, u.team, u.user, u.gpu_model, u.node, u.gpus,
                                             u.gpu_fraction, u.price_per_gpu_hour, u.started_at, now)
                if self._closed and now < self._closed[-1][0]:
                    self._closed_sorted = False
                self._closed.append((now, i))
            if usage is not None:
                if now < self._last_opened_at:
                    self._opened_in_order = False
                self._last_opened_at = now
                self._open_usage.pop(job_id, None)  # re-inserted last: the dict's order is the ledger's
                self._open_usage[job_id] = len(self._usage)
                self._usage.append(UsageRecord(job_id, changes.get("attempt", rec.attempt), rec.team, rec.user,
                                               usage.get("gpu_model"), usage.get("node"), usage["gpus"],
                                               usage["gpu_fraction"], usage["price_per_gpu_hour"], now, None))
            return new

    def _index_queued(self, rec: JobRecord) -> None:
        i = rec.id
        if rec.state is JobState.QUEUED and not rec.cancel_requested:
            if i not in self._qver:
                if i < self._qver_last:
                    self._qver_sorted = False
                else:
                    self._qver_last = i
            self._qver[i] = (rec.updated_at, rec.attempt, rec.retries, rec.attained_gpu_s, rec.pending_reason,
                             rec.estimated_start_at)
        else:
            self._qver.pop(i, None)

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
            self._log.append(job_id)
            self._index_cancel(new)
            self._index_queued(new)

    def update_many(self, changes: dict[int, dict[str, Any]]) -> None:
        """`update_fields` for many jobs at once; a job that no longer exists is skipped."""
        checked = {job_id: self._check_fields(ch) for job_id, ch in changes.items()}
        with self._lock:
            for job_id, ch in checked.items():
                rec = self._jobs.get(job_id)
                if rec is not None:
                    new = _with(rec, **ch)
                    self._jobs[job_id] = new
                    self._log.append(job_id)
                    self._index_cancel(new)
                    self._index_queued(new)

    def queued_versions(self) -> dict[int, tuple]:
        """As Store.queued_versions."""
        with self._lock:
            if not self._qver_sorted:
                self._qver = dict(sorted(self._qver.items()))
                self._qver_sorted = True
                self._qver_last = next(reversed(self._qver), 0)
            return dict(self._qver)

    def changes_since(self, pos: int) -> tuple[int, list[int]]:
        """As Store.changes_since: every write of a job record appends the job's id to a log (an id
        appears once per write), so a reader that keeps its position reads only what changed. The
        log grows with the writes (an int each), as the jobs' event lists do."""
        with self._lock:
            return len(self._log), self._log[pos:]

    def jobs_by_id(self, ids: Iterable[int]) -> list[JobRecord]:
        return [self._jobs[i] for i in sorted(set(ids)) if i in self._jobs]

    def request_cancel(self, job_id: int) -> JobRecord:
        with self._lock:
            rec = self._jobs.get(job_id)
            if rec is None:
                raise UnknownJob(job_id)
            new = _with(rec, cancel_requested=True)
            self._jobs[job_id] = new
            self._log.append(job_id)
            self._index_cancel(new)
            self._index_queued(new)
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

    # -- the usage ledger, nodes, teams (as Store) ------------------------------------------------

    def usage(self, since: float | None = None, until: float | None = None, team: str | None = None,
              user: str | None = None, opened_since: float | None = None) -> list[UsageRecord]:
        with self._lock:
            if since is not None and until is None and team is None and user is None and self._closed_sorted:
                pos = bisect.bisect_right(self._closed, (since, math.inf))
                ledger = self._usage
                if opened_since is None:
                    opened = list(self._open_usage.values())
                elif self._opened_in_order:  # the newest first, up to the first opened before
                    opened = []
                    for i in reversed(self._open_usage.values()):
                        if ledger[i].started_at < opened_since:
                            break
                        opened.append(i)
                else:
                    opened = [i for i in self._open_usage.values() if ledger[i].started_at >= opened_since]
                idx = sorted([i for _, i in self._closed[pos:]] + opened)
                return [ledger[i] for i in idx]
            return [u for u in self._usage
                    if (opened_since is None or u.ended_at is not None or u.started_at >= opened_since)
                    and (since is None or u.ended_at is None or u.ended_at > since)
                    and (until is None or u.started_at < until)
                    and (team is None or u.team == team) and (user is None or u.user == user)]

    def nodes(self) -> dict[str, NodeRecord]:
        with self._lock:
            return dict(self._nodes)

    def upsert_node(self, node_id: str, name: str, now: float) -> NodeRecord:
        with self._lock:
            rec = self._nodes.get(node_id)
            if rec is None:
                rec = NodeRecord(node_id, name, False, None, False, None, None, now)
            elif rec.lost or rec.name != name:
                rec = NodeRecord(node_id, name, rec.drained, rec.drain_reason, False, None, rec.xid_ack, now)
            self._nodes[node_id] = rec
            return rec

    def mark_node_lost(self, node_id: str, now: float) -> None:
        with self._lock:
            if (r := self._nodes.get(node_id)) is not None:
                self._nodes[node_id] = NodeRecord(node_id, r.name, r.drained, r.drain_reason, True, now, r.xid_ack, now)

    def set_drained(self, node_id: str, drained: bool, *, reason: str | None, now: float,
                    xid_ack: dict | None = None) -> NodeRecord:
        with self._lock:
            r = self._nodes.get(node_id)
            if r is None:
                raise KeyError(f"node {node_id} is not known to Shoal")
            rec = NodeRecord(node_id, r.name, drained, reason if drained else None, r.lost, r.lost_at,
                             xid_ack if xid_ack is not None else r.xid_ack, now)
            self._nodes[node_id] = rec
            return rec

    def quarantine_corrupt(self, now: float, scan: bool = True) -> list[tuple[int, str]]:
        return []  # records in memory are never corrupted (they are never parsed)

    def team_configs(self, config):
        return dict(sorted(config.teams.items()))  # no admin edits in memory: the config's teams

    def cohort_configs(self, config):
        return dict(sorted(config.cohorts.items()))
