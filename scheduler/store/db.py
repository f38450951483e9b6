"""The Store: every write is one transaction; state changes are compare-and-set on the current
state and append their event in the same transaction, so history and state never disagree and
two writers (API thread, service loop) cannot both move the same job."""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, fields
from typing import Any, Iterable

import orjson
from sqlalchemy import and_, create_engine, event, func, or_, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import StaticPool

from scheduler.accounting import UsageRecord
from scheduler.lifecycle import ACTIVE, JobState, check_transition
from scheduler.store import migrate as migrations
from scheduler.store.schema import EventRow, JobRow, LeaseRow, NodeRow, UsageRow
from scheduler.store.tenancy import TenancyStore

LEADER = "leader"  # the lease row the scheduler replicas contend for
CORRUPT = "__shoal_corrupt__"  # what a JSON column that does not parse reads as
log = logging.getLogger("shoal.store")


class CorruptRow(ValueError):
    """A job row Shoal cannot read (a state it does not know, JSON that does not parse)."""

    def __init__(self, job_id: int, problem: str):
        super().__init__(f"job {job_id}: corrupted row: {problem}")
        self.job_id, self.problem = job_id, problem


_LONG_NUMBER = re.compile(r"\d{19}")
_LONG_NUMBER_B = re.compile(rb"\d{19}")


def _json_loads(text: str):
    """JSON columns: a value that does not parse (SQLite stores text) is reported, not raised, so
    one bad row cannot make every query fail. orjson first (several times faster on a job's spec;
    the service reads every new queued job); what it refuses (NaN, which json.dumps writes for a
    NaN loss, integers beyond 64 bits) is read by the standard library as before."""
    if not (_LONG_NUMBER if isinstance(text, str) else _LONG_NUMBER_B).search(text):  # orjson reads an integer beyond 64 bits as a float
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
    try:
        return json.loads(text)
    except ValueError as e:
        return {CORRUPT: f"invalid JSON ({e})"}


class UnknownJob(KeyError):
    def __init__(self, job_id: int):
        super().__init__(f"job {job_id} does not exist")
        self.job_id = job_id


class Conflict(RuntimeError):
    """The job was not in the expected state (another writer moved it first)."""


class Fenced(RuntimeError):
    """This replica's fencing token is no longer the lease's: another replica leads now, and
    nothing was written."""


@dataclass(frozen=True)
class NodeRecord:
    node_id: str
    name: str
    drained: bool
    drain_reason: str | None
    lost: bool
    lost_at: float | None
    xid_ack: dict | None
    updated_at: float

    @classmethod
    def of(cls, row: NodeRow) -> NodeRecord:
        return cls(**{f.name: getattr(row, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class Lease:
    name: str
    holder: str | None
    token: int
    expires_at: float


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
    estimated_start_at: float | None = None  # the policy's estimated start while queued

    @classmethod
    def of(cls, row: JobRow) -> JobRecord:
        values = {name: getattr(row, name) for name in _JOB_FIELDS}
        try:
            values["state"] = JobState(row.state)
        except ValueError:
            raise CorruptRow(row.id, f"state {row.state!r} is not a job state") from None
        for name in ("spec", "placement", "progress", "result"):
            if isinstance(values[name], dict) and CORRUPT in values[name]:
                raise CorruptRow(row.id, f"{name}: {values[name][CORRUPT]}")
        if not isinstance(values["spec"], dict):
            raise CorruptRow(row.id, f"spec: a JSON object was expected, not {type(values['spec']).__name__}")
        return cls(**values)


_JOB_FIELDS = tuple(f.name for f in fields(JobRecord))  # dataclasses.fields() per row cost 40 us


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
        engine = create_engine(url, connect_args={"check_same_thread": False}, json_deserializer=_json_loads,
                               **({"poolclass": StaticPool} if memory else {}))
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # pre-ping: a connection the server dropped (restart, proxy) is replaced, not handed out
    return create_engine(url, pool_pre_ping=True, pool_recycle=300, json_deserializer=_json_loads)


_MUTABLE = {
    "placement", "pending_reason", "progress", "result", "failure_reason", "cancel_requested",
    "last_checkpoint_step", "started_at", "finished_at", "attempt", "retries",
    "last_checkpoint_at", "attempt_started_at", "attained_gpu_s", "estimated_start_at",
}


class Store(TenancyStore):  # teams, users, tokens, idempotency: store/tenancy.py
    """`migrate=True` brings the database to the newest schema revision on open (alembic;
    refuses a database migrated by a newer Shoal). `fence_token`, when set (by the leader
    election, scheduler/ha.py), makes every write of the control loop check in its own
    transaction that this replica still holds the leader lease with that token (`Fenced`)."""

    def __init__(self, url: str, *, migrate: bool = True):
        self.url = url
        self.engine = make_engine(url)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        self.fence_token: int | None = None
        self._corrupt: dict[int, str] = {}  # rows a read skipped; quarantine_corrupt() fails them
        if migrate:
            migrations.upgrade(self.engine, url)

    def _check_fence(self, s) -> None:
        """Last step of a write transaction, after its writes: the writer now holds its locks
        (SQLite: the database write lock, so no takeover can commit before this one does), and on
        PostgreSQL the lease row is share-locked, so a takeover waits for this transaction. A
        takeover committed earlier is seen here and the whole transaction rolls back."""
        if self.fence_token is None:
            return
        token = s.execute(select(LeaseRow.token).where(LeaseRow.name == LEADER)
                          .with_for_update(read=True)).scalar()
        if token != self.fence_token:
            raise Fenced(f"fencing token {self.fence_token} is stale (the lease is at {token}): "
                         "another replica is the leader; nothing written")

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
            self._check_fence(s)
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
            self._check_fence(s)

    def update_many(self, changes: dict[int, dict[str, Any]]) -> None:
        """`update_fields` for many jobs in ONE transaction (the service's pending reasons and
        estimated starts: one commit per cycle, not one per queued job). A job that no longer
        exists is skipped (it was deleted meanwhile; nothing else to change)."""
        from sqlalchemy import bindparam

        by_fields: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for job_id, ch in changes.items():
            bad = set(ch) - _MUTABLE
            if bad:
                raise ValueError(f"not a mutable job field: {sorted(bad)}")
            by_fields.setdefault(tuple(sorted(ch)), []).append({"_id": job_id, **{f"_{k}": v for k, v in ch.items()}})
        if not by_fields:
            return
        t = JobRow.__table__
        with self._session.begin() as s:
            for names, rows in by_fields.items():
                s.execute(update(t).where(t.c.id == bindparam("_id"))
                          .values(**{k: bindparam(f"_{k}") for k in names}), rows)
            self._check_fence(s)

    def queued_versions(self) -> dict[int, tuple]:
        """QUEUED jobs not being cancelled: id -> the columns that change while a job waits
        (updated_at, attempt, retries, attained GPU-s, pending reason, estimated start), read
        without their JSON. The service re-reads a whole row only when these differ."""
        t = JobRow.__table__
        q = (select(t.c.id, t.c.updated_at, t.c.attempt, t.c.retries, t.c.attained_gpu_s, t.c.pending_reason,
                    t.c.estimated_start_at)
             .where(t.c.state == JobState.QUEUED.value, t.c.cancel_requested.is_(False)).order_by(t.c.id))
        with self.engine.connect() as c:
            return {row[0]: tuple(row[1:]) for row in c.execute(q)}

    def changes_since(self, pos: int) -> tuple[int, list[int]] | None:
        """(the log's end, ids of the jobs whose records were written after position `pos`) where
        the store keeps a change log; None here: several processes write these tables, so a reader
        reads the rows it needs (queued_versions, active_jobs). MemoryStore keeps one."""
        return None

    def jobs_by_id(self, ids: Iterable[int]) -> list[JobRecord]:
        """The jobs with these ids (missing ones skipped), in id order."""
        ids = list(ids)
        out: list[JobRecord] = []
        t = JobRow.__table__
        with self.engine.connect() as c:  # Core rows (no ORM identity map): JobRecord.of reads them alike
            for i in range(0, len(ids), 500):  # bounded IN lists
                out += self._records(c.execute(select(t).where(t.c.id.in_(ids[i:i + 500]))))
        return sorted(out, key=lambda j: j.id)

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
            return self._records(s.scalars(q))

    def _records(self, rows) -> list[JobRecord]:
        out = []
        for row in rows:
            try:
                out.append(JobRecord.of(row))
            except CorruptRow as e:  # skipped here, failed for good by quarantine_corrupt()
                if row.id not in self._corrupt:
                    log.error("%s", e)
                self._corrupt[row.id] = e.problem
        return out

    def quarantine_corrupt(self, now: float, scan: bool = True) -> list[tuple[int, str]]:
        """Every corrupted job row seen by a read, or (`scan`) with a state Shoal does not know,
        becomes FAILED with the problem as its reason (the bad JSON values are replaced; the
        event keeps what the state was). Returns [(job id, problem)]."""
        valid = [st.value for st in JobState]
        bad_state = []
        if scan:
            with self._session() as s:
                bad_state = s.execute(select(JobRow.id, JobRow.state).where(JobRow.state.not_in(valid))).all()
        found = dict(self._corrupt)
        found.update({jid: f"state {st!r} is not a job state" for jid, st in bad_state})
        done = []
        for jid, problem in sorted(found.items()):
            with self._session.begin() as s:
                raw = s.execute(select(JobRow.state).where(JobRow.id == jid)).scalar()
                if raw is None:
                    continue
                fix = {"state": JobState.FAILED.value, "failure_reason": f"corrupted row: {problem}",
                       "placement": None, "finished_at": now, "updated_at": now}
                for name in ("spec", "progress", "result"):
                    col = getattr(JobRow, name)
                    val = s.execute(select(col).where(JobRow.id == jid)).scalar()
                    if (isinstance(val, dict) and CORRUPT in val) or (name == "spec" and not isinstance(val, dict)):
                        fix[name] = {} if name == "spec" else None
                s.execute(update(JobRow).where(JobRow.id == jid).values(**fix))
                s.add(EventRow(job_id=jid, ts=now, from_state=str(raw)[:16], to_state=JobState.FAILED.value,
                               attempt=0, reason=f"corrupted row: {problem}; failed for good"))
                s.flush()
                self._check_fence(s)
            self._corrupt.pop(jid, None)
            done.append((jid, problem))
        return done

    def active_jobs(self) -> list[JobRecord]:
        return self.jobs(states=ACTIVE)

    def events(self, job_id: int) -> list[EventRecord]:
        with self._session() as s:
            if s.get(JobRow, job_id) is None:
                raise UnknownJob(job_id)
            rows = s.scalars(select(EventRow).where(EventRow.job_id == job_id).order_by(EventRow.id))
            return [EventRecord(r.job_id, r.ts, r.from_state, r.to_state, r.attempt, r.reason) for r in rows]

    def usage(self, since: float | None = None, until: float | None = None, team: str | None = None,
              user: str | None = None, opened_since: float | None = None) -> list[UsageRecord]:
        """Ledger records (one per attempt) overlapping [since, until], oldest first; with
        `opened_since`, open records only when they started at or after it (what changed since a
        reader's last look, with `since` the same time)."""
        q = select(UsageRow).order_by(UsageRow.id)
        is_open = UsageRow.ended_at.is_(None)
        if opened_since is not None:
            is_open = and_(is_open, UsageRow.started_at >= opened_since)
            if since is None:
                q = q.where(or_(UsageRow.ended_at.is_not(None), is_open))
        if since is not None:
            q = q.where(or_(is_open, UsageRow.ended_at > since))
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

    # -- nodes ------------------------------------------------------------------------------

    def nodes(self) -> dict[str, NodeRecord]:
        with self._session() as s:
            return {r.node_id: NodeRecord.of(r) for r in s.scalars(select(NodeRow))}

    def upsert_node(self, node_id: str, name: str, now: float) -> NodeRecord:
        """Record a node the scheduler sees (idempotent; a returning lost node is un-lost)."""
        with self._session.begin() as s:
            row = s.get(NodeRow, node_id, with_for_update=True)
            if row is None:
                row = NodeRow(node_id=node_id, name=name, drained=False, lost=False, updated_at=now)
                s.add(row)
            elif row.lost or row.name != name:
                row.lost, row.lost_at, row.name, row.updated_at = False, None, name, now
            s.flush()
            self._check_fence(s)
            return NodeRecord.of(row)

    def mark_node_lost(self, node_id: str, now: float) -> None:
        with self._session.begin() as s:
            s.execute(update(NodeRow).where(NodeRow.node_id == node_id)
                      .values(lost=True, lost_at=now, updated_at=now))
            self._check_fence(s)

    def set_drained(self, node_id: str, drained: bool, *, reason: str | None, now: float,
                    xid_ack: dict | None = None) -> NodeRecord:
        """Drain (`drained=True`, with the reason) or undrain a node. An operator's request (CLI),
        so not fenced: any replica may record it and the leader acts on it."""
        with self._session.begin() as s:
            row = s.get(NodeRow, node_id, with_for_update=True)
            if row is None:
                raise KeyError(f"node {node_id} is not known to Shoal")
            row.drained, row.drain_reason, row.updated_at = drained, reason if drained else None, now
            if xid_ack is not None:
                row.xid_ack = xid_ack
            s.flush()
            return NodeRecord.of(row)

    # -- leader lease -----------------------------------------------------------------------

    def lease(self, name: str = LEADER) -> Lease | None:
        with self._session() as s:
            row = s.get(LeaseRow, name)
            return None if row is None else Lease(row.name, row.holder, row.token, row.expires_at)

    def try_acquire_lease(self, holder: str, ttl_s: float, now: float, name: str = LEADER) -> int | None:
        """Take the lease if it is free, expired, or was held by an earlier incarnation of
        `holder` (same replica id: it restarted); returns the new fencing token (the old one + 1,
        so whoever held it before is fenced), or None while another replica holds it."""
        free = or_(LeaseRow.holder.is_(None), LeaseRow.holder == holder, LeaseRow.expires_at <= now)
        with self._session.begin() as s:
            # One conditional UPDATE: atomic on both databases (no read-then-write window).
            res = s.execute(update(LeaseRow).where(LeaseRow.name == name, free)
                            .values(holder=holder, token=LeaseRow.token + 1, expires_at=now + ttl_s))
            if res.rowcount != 1:
                return None
            return s.execute(select(LeaseRow.token).where(LeaseRow.name == name)).scalar_one()

    def renew_lease(self, holder: str, token: int, ttl_s: float, now: float, name: str = LEADER) -> bool:
        """Extend the lease; False when it was taken over (this replica must stop leading)."""
        with self._session.begin() as s:
            res = s.execute(update(LeaseRow).where(LeaseRow.name == name, LeaseRow.holder == holder,
                                                   LeaseRow.token == token).values(expires_at=now + ttl_s))
            return res.rowcount == 1

    def release_lease(self, holder: str, token: int, name: str = LEADER) -> None:
        """On a clean stop: a follower can take over at once instead of waiting out the TTL."""
        with self._session.begin() as s:
            s.execute(update(LeaseRow).where(LeaseRow.name == name, LeaseRow.holder == holder,
                                             LeaseRow.token == token).values(expires_at=0.0))
