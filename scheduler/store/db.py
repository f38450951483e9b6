"""The Store: every write is one transaction; state changes are compare-and-set on the current
state and append their event in the same transaction, so history and state never disagree and
two writers (API thread, service loop) cannot both move the same job."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Iterable

from sqlalchemy import create_engine, event, func, or_, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import StaticPool

from scheduler.accounting import UsageRecord
from scheduler.lifecycle import ACTIVE, JobState, check_transition
from scheduler.store.schema import SCHEMA_VERSION, Base, EventRow, JobRow, MetaRow, UsageRow
from scheduler.store.tenancy import TenancyStore


class UnknownJob(KeyError):
    def __init__(self, job_id: int):
        super().__init__(f"job {job_id} does not exist")
        self.job_id = job_id


class Conflict(RuntimeError):
    """The job was not in the expected state (another writer moved it first)."""


@dataclass(frozen=True)
class JobRecord:
    id: int
    name: str
    team: str
    user: str
    priority: int
    state: JobState
    spec: dict
    gpus: int
    memory_per_gpu_mib: int
    submitted_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    attempt: int
    retries: int
    placement: dict | None
    pending_reason: str | None
    progress: dict | None
    result: dict | None
    failure_reason: str | None
    cancel_requested: bool
    last_checkpoint_step: int | None
    last_checkpoint_at: float | None
    attempt_started_at: float | None
    attained_gpu_s: float

    @classmethod
    def of(cls, row: JobRow) -> JobRecord:
        values = {f.name: getattr(row, f.name) for f in fields(cls)}
        values["state"] = JobState(row.state)
        return cls(**values)


@dataclass(frozen=True)
class EventRecord:
    job_id: int
    ts: float
    from_state: str | None
    to_state: str
    attempt: int
    reason: str


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers don't block the writer
    cur.execute("PRAGMA synchronous=NORMAL")  # durable at WAL checkpoints; safe with WAL
    cur.execute("PRAGMA busy_timeout=10000")  # wait for a concurrent writer instead of failing
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        # An in-memory database ("sqlite://", used by the simulator) exists per connection:
        # keep exactly one, shared by all threads.
        memory = url in ("sqlite://", "sqlite:///:memory:")
        engine = create_engine(url, connect_args={"check_same_thread": False},
                               **({"poolclass": StaticPool} if memory else {}))
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


_MUTABLE = {
    "placement", "pending_reason", "progress", "result", "failure_reason", "cancel_requested",
    "last_checkpoint_step", "started_at", "finished_at", "attempt", "retries",
    "last_checkpoint_at", "attempt_started_at", "attained_gpu_s",
}


class Store(TenancyStore):  # teams, users, tokens, idempotency, drains: store/tenancy.py
    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        Base.metadata.create_all(self.engine)  # migrations: issue #8 (alembic)
        self._check_schema_version()

    def _check_schema_version(self) -> None:
        with self._session.begin() as s:
            row = s.get(MetaRow, "schema_version")
            if row is None:
                s.add(MetaRow(key="schema_version", value=str(SCHEMA_VERSION)))
            elif int(row.value) > SCHEMA_VERSION:
                raise RuntimeError(
                    f"database {self.url} has schema version {row.value}, newer than this Shoal "
                    f"({SCHEMA_VERSION}); upgrade Shoal"
                )

    def close(self) -> None:
        self.engine.dispose()

    # -- writes -----------------------------------------------------------------------------

    def submit(self, *, spec: dict, name: str, team: str, user: str, priority: int, gpus: int,
               memory_per_gpu_mib: int, now: float, reason: str = "submitted") -> JobRecord:
        with self._session.begin() as s:
            row = JobRow(
                name=name, team=team, user=user, priority=priority, state=JobState.QUEUED.value,
                spec=spec, gpus=gpus, memory_per_gpu_mib=memory_per_gpu_mib, submitted_at=now,
                updated_at=now, attempt=0, retries=0, cancel_requested=False,
            )
            s.add(row)
            s.flush()
            s.add(EventRow(job_id=row.id, ts=now, from_state=None, to_state=JobState.QUEUED.value,
                           attempt=0, reason=reason))
            return JobRecord.of(row)

    def transition(self, job_id: int, src: JobState | Iterable[JobState], dst: JobState, *,
                   reason: str, now: float, usage: dict | None = None, **changes: Any) -> JobRecord:
        """Move `job_id` from `src` (one state or any of several) to `dst`, apply `changes`, and
        append the event, atomically. Raises IllegalTransition for a move the lifecycle forbids
        and Conflict when the job is not in `src` any more. Usage ledger, same transaction:
        `usage` (gpu_model, node, gpus, gpu_fraction, price_per_gpu_hour) opens the new attempt's
        record; leaving the active states closes the open one."""
        sources = {src} if isinstance(src, JobState) else set(src)
        bad = set(changes) - _MUTABLE
        if bad:
            raise ValueError(f"not a mutable job field: {sorted(bad)}")
        with self._session.begin() as s:
            row = s.get(JobRow, job_id, with_for_update=True)
            if row is None:
                raise UnknownJob(job_id)
            cur = JobState(row.state)
            if cur not in sources:
                raise Conflict(f"job {job_id} is {cur.value}, expected {'/'.join(x.value for x in sources)}")
            check_transition(job_id, cur, dst)
            res = s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.state == cur.value)
                .values(state=dst.value, updated_at=now, **changes)
            )
            if res.rowcount != 1:  # a writer slipped in between read and update
                raise Conflict(f"job {job_id} changed concurrently")
            s.add(EventRow(job_id=job_id, ts=now, from_state=cur.value, to_state=dst.value,
                           attempt=changes.get("attempt", row.attempt), reason=reason))
            if cur.active and not dst.active:
                s.execute(update(UsageRow).where(UsageRow.job_id == job_id, UsageRow.ended_at.is_(None))
                          .values(ended_at=now))
            if usage is not None:
                s.add(UsageRow(job_id=job_id, attempt=changes.get("attempt", row.attempt), team=row.team,
                               user=row.user, started_at=now, **usage))
            s.flush()
            s.refresh(row)
            return JobRecord.of(row)

    def update_fields(self, job_id: int, **changes: Any) -> None:
        """Change non-state fields (progress, pending reason, ...). No event is written."""
        bad = set(changes) - _MUTABLE
        if bad:
            raise ValueError(f"not a mutable job field: {sorted(bad)}")
        with self._session.begin() as s:
            res = s.execute(update(JobRow).where(JobRow.id == job_id).values(**changes))
            if res.rowcount != 1:
                raise UnknownJob(job_id)

    def request_cancel(self, job_id: int) -> JobRecord:
        with self._session.begin() as s:
            row = s.get(JobRow, job_id)
            if row is None:
                raise UnknownJob(job_id)
            row.cancel_requested = True
            return JobRecord.of(row)

    # -- reads ------------------------------------------------------------------------------

    def get(self, job_id: int) -> JobRecord:
        with self._session() as s:
            row = s.get(JobRow, job_id)
            if row is None:
                raise UnknownJob(job_id)
            return JobRecord.of(row)

    def jobs(self, *, states: Iterable[JobState] | None = None, team: str | None = None,
             limit: int | None = None, cancel_requested: bool | None = None) -> list[JobRecord]:
        q = select(JobRow).order_by(JobRow.id)
        if states is not None:
            q = q.where(JobRow.state.in_([s.value for s in states]))
        if team is not None:
            q = q.where(JobRow.team == team)
        if cancel_requested is not None:
            q = q.where(JobRow.cancel_requested == cancel_requested)
        if limit is not None:
            q = q.limit(limit)
        with self._session() as s:
            return [JobRecord.of(r) for r in s.scalars(q)]

    def active_jobs(self) -> list[JobRecord]:
        return self.jobs(states=ACTIVE)

    def events(self, job_id: int) -> list[EventRecord]:
        with self._session() as s:
            if s.get(JobRow, job_id) is None:
                raise UnknownJob(job_id)
            rows = s.scalars(select(EventRow).where(EventRow.job_id == job_id).order_by(EventRow.id))
            return [EventRecord(r.job_id, r.ts, r.from_state, r.to_state, r.attempt, r.reason) for r in rows]

    def usage(self, since: float | None = None, until: float | None = None, team: str | None = None,
              user: str | None = None) -> list[UsageRecord]:
        """Ledger records (one per attempt) overlapping [since, until], oldest first."""
        q = select(UsageRow).order_by(UsageRow.id)
        if since is not None:
            q = q.where(or_(UsageRow.ended_at.is_(None), UsageRow.ended_at > since))
        if until is not None:
            q = q.where(UsageRow.started_at < until)
        if team is not None:
            q = q.where(UsageRow.team == team)
        if user is not None:
            q = q.where(UsageRow.user == user)
        with self._session() as s:
            return [UsageRecord(r.job_id, r.attempt, r.team, r.user, r.gpu_model, r.node, r.gpus, r.gpu_fraction,
                                r.price_per_gpu_hour, r.started_at, r.ended_at) for r in s.scalars(q)]

    def count_by_state_team(self) -> dict[tuple[str, str], int]:
        with self._session() as s:
            rows = s.execute(select(JobRow.state, JobRow.team, func.count()).group_by(JobRow.state, JobRow.team))
            return {(st, team): n for st, team, n in rows}
