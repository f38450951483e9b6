"""Store methods for the API's tenancy (issue #7): teams, cohorts, users, API tokens, idempotent
submissions, node drains, and the paged job listing. Mixed into `Store` (scheduler/store/db.py),
whose engine and session factory they use; every write is one transaction, as elsewhere.

Teams and cohorts come from the cluster config and are copied into the database on first start
(`seed_tenancy`); from then on admins edit them through the API and the database rows win
(`team_configs(config)` is the config's teams with the rows applied; a deleted row hides a team).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError

from scheduler.lifecycle import JobState
from scheduler.spec import ClusterConfig, CohortConfig, TeamConfig
from scheduler.store.schema import (
    CohortRow, EventRow, IdempotencyRow, JobRow, MetaRow, TeamRow, TokenRow, UserRow,
)


@dataclass(frozen=True)
class UserRecord:
    name: str
    team: str | None
    role: str
    created_at: float


@dataclass(frozen=True)
class TokenRecord:
    id: str
    user: str
    description: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None


@dataclass(frozen=True)
class QueueRow:
    """A queued job as GET /v1/queue shows it (no JSON columns read)."""
    id: int
    name: str
    team: str
    user: str
    priority: int
    gpus: int
    submitted_at: float
    pending_reason: str | None
    estimated_start_at: float | None


class IdempotencyMismatch(ValueError):
    """The key was used before with a different request body."""

    def __init__(self, key: str, job_id: int):
        super().__init__(f"Idempotency-Key {key!r} was already used for a different request (job {job_id})")
        self.key, self.job_id = key, job_id


def _job(row: JobRow) -> Any:
    from scheduler.store.db import JobRecord  # db.py imports this module

    return JobRecord.of(row)


def _new_job(job_id: int, params: dict) -> Any:
    """The record of a job just inserted with `params` (TenancyStore._job_params)."""
    from scheduler.store.db import JobRecord

    return JobRecord(id=job_id, name=params["name"], team=params["team"], user=params["user"],
                     priority=params["priority"], state=JobState.QUEUED, spec=params["spec"], gpus=params["gpus"],
                     memory_per_gpu_mib=params["memory_per_gpu_mib"], submitted_at=params["submitted_at"],
                     updated_at=params["updated_at"], started_at=None, finished_at=None, attempt=0, retries=0,
                     placement=None, pending_reason=None, progress=None, result=None, failure_reason=None,
                     cancel_requested=False, last_checkpoint_step=None, last_checkpoint_at=None,
                     attempt_started_at=None, attained_gpu_s=0.0, estimated_start_at=None)


def _user(r: UserRow) -> UserRecord:
    return UserRecord(r.name, r.team, r.role, r.created_at)


def _token(r: TokenRow) -> TokenRecord:
    return TokenRecord(r.id, r.user, r.description, r.created_at, r.expires_at, r.revoked_at)


class TenancyStore:
    """Mixin: needs `self._session` (a sessionmaker) from the host class."""

    _session: Any

    # -- teams and cohorts ----------------------------------------------------------------------
    def seed_tenancy(self, config: ClusterConfig, now: float) -> bool:
        """Copy the config's teams and cohorts into the database once (first start). Returns
        True if it seeded. Later config edits to a seeded team are overridden by its row."""
        with self._session.begin() as s:
            if s.get(MetaRow, "tenancy_seeded") is not None:
                return False
            for name, team in config.teams.items():
                if s.get(TeamRow, name) is None:
                    s.add(TeamRow(name=name, config=team.model_dump(mode="json"), deleted=False, updated_at=now))
            for name, cohort in config.cohorts.items():
                if s.get(CohortRow, name) is None:
                    s.add(CohortRow(name=name, parent=cohort.parent, deleted=False, updated_at=now))
            s.add(MetaRow(key="tenancy_seeded", value=str(now)))
            return True

    def claim_meta(self, key: str, value: str) -> str:
        """Store `value` under `key` unless a value is already there; returns the stored one
        (so concurrent first starts agree on a single value)."""
        with self._session.begin() as s:
            row = s.get(MetaRow, key)
            if row is None:
                s.add(MetaRow(key=key, value=value))
                return value
            return row.value

    def set_meta(self, key: str, value: str) -> None:
        with self._session.begin() as s:
            s.merge(MetaRow(key=key, value=value))

    def team_configs(self, config: ClusterConfig) -> dict[str, TeamConfig]:
        """The cluster's teams: those of `config`, with the database's rows applied (added,
        changed or deleted by admins through the API)."""
        teams = dict(config.teams)
        with self._session() as s:
            for row in s.scalars(select(TeamRow)):
                if row.deleted:
                    teams.pop(row.name, None)
                else:
                    teams[row.name] = TeamConfig.model_validate(row.config)
        return dict(sorted(teams.items()))

    def cohort_configs(self, config: ClusterConfig) -> dict[str, CohortConfig]:
        cohorts = dict(config.cohorts)
        with self._session() as s:
            for row in s.scalars(select(CohortRow)):
                if row.deleted:
                    cohorts.pop(row.name, None)
                else:
                    cohorts[row.name] = CohortConfig(parent=row.parent)
        return dict(sorted(cohorts.items()))

    def put_team(self, name: str, team: TeamConfig, now: float) -> None:
        with self._session.begin() as s:
            s.merge(TeamRow(name=name, config=team.model_dump(mode="json"), deleted=False, updated_at=now))

    def delete_team(self, name: str, now: float) -> None:
        with self._session.begin() as s:
            s.merge(TeamRow(name=name, config={}, deleted=True, updated_at=now))

    def put_cohort(self, name: str, cohort: CohortConfig, now: float) -> None:
        with self._session.begin() as s:
            s.merge(CohortRow(name=name, parent=cohort.parent, deleted=False, updated_at=now))

    def delete_cohort(self, name: str, now: float) -> None:
        with self._session.begin() as s:
            s.merge(CohortRow(name=name, parent=None, deleted=True, updated_at=now))

    # -- users and tokens -----------------------------------------------------------------------
    def put_user(self, name: str, team: str | None, role: str, now: float) -> UserRecord:
        with self._session.begin() as s:
            row = s.get(UserRow, name)
            if row is None:
                row = UserRow(name=name, team=team, role=role, created_at=now)
                s.add(row)
            else:
                row.team, row.role = team, role
            return _user(row)

    def get_user(self, name: str) -> UserRecord | None:
        with self._session() as s:
            row = s.get(UserRow, name)
            return None if row is None else _user(row)

    def users(self, team: str | None = None) -> list[UserRecord]:
        q = select(UserRow).order_by(UserRow.name)
        if team is not None:
            q = q.where(UserRow.team == team)
        with self._session() as s:
            return [_user(r) for r in s.scalars(q)]

    def delete_user(self, name: str, now: float) -> bool:
        """Removes the user; their tokens are revoked (kept for the audit trail)."""
        with self._session.begin() as s:
            row = s.get(UserRow, name)
            if row is None:
                return False
            for tok in s.scalars(select(TokenRow).where(TokenRow.user == name, TokenRow.revoked_at.is_(None))):
                tok.revoked_at = now
            row.role, row.team = "disabled", None
            return True

    def add_token(self, token_id: str, digest: str, user: str, description: str, created_at: float,
                  expires_at: float | None) -> TokenRecord:
        with self._session.begin() as s:
            row = TokenRow(id=token_id, digest=digest, user=user, description=description,
                           created_at=created_at, expires_at=expires_at, revoked_at=None)
            s.add(row)
            return _token(row)

    def token_principal(self, digest: str) -> tuple[TokenRecord, UserRecord] | None:
        with self._session() as s:
            row = s.execute(select(TokenRow, UserRow).join(UserRow, TokenRow.user == UserRow.name)
                            .where(TokenRow.digest == digest)).first()
            return None if row is None else (_token(row[0]), _user(row[1]))

    def tokens(self, user: str | None = None, team: str | None = None) -> list[TokenRecord]:
        q = select(TokenRow).order_by(TokenRow.created_at, TokenRow.id)
        if user is not None:
            q = q.where(TokenRow.user == user)
        if team is not None:
            q = q.join(UserRow, TokenRow.user == UserRow.name).where(UserRow.team == team)
        with self._session() as s:
            return [_token(r) for r in s.scalars(q)]

    def get_token(self, token_id: str) -> TokenRecord | None:
        with self._session() as s:
            row = s.get(TokenRow, token_id)
            return None if row is None else _token(row)

    def revoke_token(self, token_id: str, now: float) -> TokenRecord | None:
        with self._session.begin() as s:
            row = s.get(TokenRow, token_id)
            if row is None:
                return None
            if row.revoked_at is None:
                row.revoked_at = now
            return _token(row)

    # -- jobs: idempotent submit and paged listing ----------------------------------------------
    def submit_idempotent(self, *, key_owner: str, key: str, request_digest: str,
                          **submit: Any) -> tuple[Any, bool]:
        """`submit(**submit)` once per (key_owner, key): returns (job, True) the first time and
        (the same job, False) on a retry with the same body. A retry with another body raises
        IdempotencyMismatch. The key row is written in the job's transaction, and two racing
        requests with one key meet at its primary key: the loser reads the winner's job."""
        existing = self._idempotent_hit(key_owner, key, request_digest)
        if existing is not None:
            return existing, False
        try:
            with self._session.begin() as s:
                job = self._insert_job(s, **submit)
                s.add(IdempotencyRow(user=key_owner, key=key, request_digest=request_digest, job_id=job.id,
                                     created_at=submit["now"]))
                s.flush()
                return _job(job), True
        except IntegrityError:
            existing = self._idempotent_hit(key_owner, key, request_digest)
            if existing is None:
                raise
            return existing, False

    def _idempotent_hit(self, user: str, key: str, request_digest: str) -> Any | None:
        with self._session() as s:
            row = s.get(IdempotencyRow, (user, key))
            if row is None:
                return None
            if row.request_digest != request_digest:
                raise IdempotencyMismatch(key, row.job_id)
            return _job(s.get(JobRow, row.job_id))

    @staticmethod
    def _insert_job(s, *, spec: dict, name: str, team: str, user: str, priority: int, gpus: int,
                    memory_per_gpu_mib: int, now: float, reason: str = "submitted") -> JobRow:
        row = JobRow(name=name, team=team, user=user, priority=priority, state=JobState.QUEUED.value,
                     spec=spec, gpus=gpus, memory_per_gpu_mib=memory_per_gpu_mib, submitted_at=now,
                     updated_at=now, attempt=0, retries=0, cancel_requested=False)
        s.add(row)
        s.flush()
        s.add(EventRow(job_id=row.id, ts=now, from_state=None, to_state=JobState.QUEUED.value,
                       attempt=0, reason=reason))
        return row

    def submit_many(self, items: list[dict]) -> list[tuple[Any, bool] | Exception]:
        """Group commit: many submissions in ONE transaction (the API's batcher calls this).
        Each item is `submit`'s keyword arguments plus optional `idem=(key_owner, key,
        request_digest)`. Returns per item (job, created) or the exception for that item
        (IdempotencyMismatch). Rows go in with bulk INSERT ... RETURNING, so the cost per job is a
        fraction of a single `submit`. If another process raced us on an idempotency key the
        whole batch falls back to one transaction per item."""
        from sqlalchemy import insert

        results: list[tuple[Any, bool] | Exception | None] = [None] * len(items)
        try:
            with self._session.begin() as s:
                keyed = {it["idem"][:2]: i for i, it in enumerate(items) if it.get("idem")}
                known = {}
                by_user: dict[str, list[str]] = {}
                for user, key in keyed:
                    by_user.setdefault(user, []).append(key)
                t = IdempotencyRow.__table__
                for user, keys in by_user.items():
                    # user = ? AND key IN (...): a search of the primary key index. A row-value
                    # IN ((user, key), ...) scanned the whole table on SQLite (cost grew with it).
                    for i in range(0, len(keys), 500):
                        rows = s.execute(select(t.c.user, t.c.key, t.c.request_digest, t.c.job_id)
                                         .where(t.c.user == user, t.c.key.in_(keys[i:i + 500]))).all()
                        known.update({(u, k): (d, j) for u, k, d, j in rows})
                fresh: list[int] = []
                first_of: dict[tuple, int] = {}
                for i, it in enumerate(items):
                    idem = it.get("idem")
                    if idem and idem[:2] in known:
                        digest, job_id = known[idem[:2]]
                        results[i] = (IdempotencyMismatch(idem[1], job_id) if digest != idem[2] else ("job", job_id))
                    elif idem and idem[:2] in first_of:  # the same key twice in this batch
                        results[i] = ("dup", first_of[idem[:2]])
                    else:
                        if idem:
                            first_of[idem[:2]] = i
                        fresh.append(i)
                ids: dict[int, int] = {}
                jobs: dict[int, Any] = {}
                if fresh:
                    # Core inserts (no ORM unit of work); the new rows are known without reading
                    # them back: a fresh job is exactly its insert parameters plus its id.
                    params = [self._job_params(**{k: v for k, v in items[i].items() if k != "idem"}) for i in fresh]
                    jobs_t = JobRow.__table__
                    got = s.execute(insert(jobs_t).returning(jobs_t.c.id, sort_by_parameter_order=True), params).all()
                    ids = {i: row[0] for i, row in zip(fresh, got)}
                    s.execute(insert(EventRow.__table__), [
                        dict(job_id=ids[i], ts=items[i]["now"], from_state=None, to_state=JobState.QUEUED.value,
                             attempt=0, reason=items[i].get("reason", "submitted")) for i in fresh])
                    keyrows = [dict(user=items[i]["idem"][0], key=items[i]["idem"][1],
                                    request_digest=items[i]["idem"][2], job_id=ids[i], created_at=items[i]["now"])
                               for i in fresh if items[i].get("idem")]
                    if keyrows:
                        s.execute(insert(IdempotencyRow.__table__), keyrows)
                    jobs = {ids[i]: _new_job(ids[i], p) for i, p in zip(fresh, params)}
                need = {r[1] for r in results if isinstance(r, tuple) and r[0] == "job"}
                if need:  # replays of keys committed before: read their jobs
                    jobs.update({r.id: _job(r) for r in s.scalars(select(JobRow).where(JobRow.id.in_(need)))})
        except IntegrityError:
            out: list[tuple[Any, bool] | Exception] = []
            for it in items:
                try:
                    kw = {k: v for k, v in it.items() if k != "idem"}
                    if it.get("idem"):
                        owner, key, digest = it["idem"]
                        out.append(self.submit_idempotent(key_owner=owner, key=key, request_digest=digest, **kw))
                    else:
                        out.append((self.submit(**kw), True))
                except IdempotencyMismatch as e:
                    out.append(e)
            return out
        final: list[tuple[Any, bool] | Exception] = []
        for i, r in enumerate(results):
            if r is None:
                final.append((jobs[ids[i]], True))
            elif isinstance(r, Exception):
                final.append(r)
            elif r[0] == "job":
                final.append((jobs[r[1]], False))
            else:  # ("dup", index of the first): same job, if the body matches
                first = items[r[1]]["idem"][2]
                final.append((jobs[ids[r[1]]], False) if first == items[i]["idem"][2]
                             else IdempotencyMismatch(items[i]["idem"][1], ids[r[1]]))
        return final

    @staticmethod
    def _job_params(*, spec: dict, name: str, team: str, user: str, priority: int, gpus: int,
                    memory_per_gpu_mib: int, now: float, reason: str = "submitted") -> dict:
        return dict(name=name, team=team, user=user, priority=priority, state=JobState.QUEUED.value, spec=spec,
                    gpus=gpus, memory_per_gpu_mib=memory_per_gpu_mib, submitted_at=now, updated_at=now, attempt=0,
                    retries=0, cancel_requested=False, attained_gpu_s=0.0)

    def queue_rows(self) -> list[QueueRow]:
        """QUEUED jobs not being cancelled, in id order, with the pending reason and estimated
        start the scheduler stored at its last cycle."""
        t = JobRow.__table__
        q = (select(t.c.id, t.c.name, t.c.team, t.c.user, t.c.priority, t.c.gpus, t.c.submitted_at,
                    t.c.pending_reason, t.c.estimated_start_at)
             .where(t.c.state == JobState.QUEUED.value, t.c.cancel_requested.is_(False)).order_by(t.c.id))
        with self._session() as s:
            return [QueueRow(*row) for row in s.execute(q)]

    def job_page(self, *, states: Iterable[JobState] | None = None, teams: Iterable[str] | None = None,
                 user: str | None = None, since: float | None = None, after_id: int = 0,
                 offset: int = 0, limit: int = 100) -> list[Any]:
        """Jobs by id, after `after_id` (cursor) and `offset`, at most `limit`. `teams=None` means
        every team; `since` keeps jobs submitted or updated at or after that time."""
        q = select(JobRow).where(JobRow.id > after_id).order_by(JobRow.id)
        if states is not None:
            q = q.where(JobRow.state.in_([s.value for s in states]))
        if teams is not None:
            q = q.where(JobRow.team.in_(list(teams)))
        if user is not None:
            q = q.where(JobRow.user == user)
        if since is not None:
            q = q.where(or_(JobRow.submitted_at >= since, JobRow.updated_at >= since))
        q = q.offset(offset).limit(limit)
        with self._session() as s:
            return [_job(r) for r in s.scalars(q)]

