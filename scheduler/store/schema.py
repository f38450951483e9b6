"""Tables. `jobs` holds the current state of each job; `job_events` is append-only history.

Times are float seconds since the Unix epoch, taken from the injected Clock (never the database's
clock), so the simulator and tests control time.
"""
from __future__ import annotations

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# The schema is versioned by alembic (scheduler/store/migrations); a change here needs a migration
# (tests/reliability/test_migrations.py fails until the migrations match these models).
SCHEMA_VERSION = 2  # the pre-alembic version stamp in shoal_meta; such databases are adopted as 0001


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(63))
    team: Mapped[str] = mapped_column(String(63), index=True)
    user: Mapped[str] = mapped_column(String(63))
    priority: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), index=True)
    spec: Mapped[dict] = mapped_column(JSON)
    gpus: Mapped[int] = mapped_column(Integer)  # resolved count ('auto' decided at submit)
    memory_per_gpu_mib: Mapped[int] = mapped_column(Integer)  # estimate used for packing
    submitted_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)  # launches so far
    retries: Mapped[int] = mapped_column(Integer, default=0)  # relaunches after failure
    placement: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    pending_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    progress: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    result: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    failure_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    last_checkpoint_step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_checkpoint_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    attempt_started_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # current attempt
    attained_gpu_s: Mapped[float] = mapped_column(Float, default=0.0)  # GPU-s of finished attempts
    estimated_start_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # policy's estimate, queued


class EventRow(Base):
    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    ts: Mapped[float] = mapped_column(Float)
    from_state: Mapped[str | None] = mapped_column(String(16), nullable=True)
    to_state: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)


class UsageRow(Base):
    """The usage ledger: one row per job attempt (see scheduler/accounting.py)."""

    __tablename__ = "usage"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    team: Mapped[str] = mapped_column(String(63), index=True)
    user: Mapped[str] = mapped_column(String(63))
    gpu_model: Mapped[str | None] = mapped_column(String(63), nullable=True)
    node: Mapped[str | None] = mapped_column(String(255), nullable=True)
    gpus: Mapped[int] = mapped_column(Integer)
    gpu_fraction: Mapped[float] = mapped_column(Float)
    price_per_gpu_hour: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float] = mapped_column(Float, index=True)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)


class MetaRow(Base):
    __tablename__ = "shoal_meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class NodeRow(Base):
    """What the scheduler decided about a node: drained (by an operator or an XID), lost (its Ray
    node died). `xid_ack` = per-GPU XID counts acknowledged at the last undrain, so only new
    faults drain it again."""
    __tablename__ = "nodes"

    node_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    drained: Mapped[bool] = mapped_column(Boolean, default=False)
    drain_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    lost: Mapped[bool] = mapped_column(Boolean, default=False)
    lost_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    xid_ack: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    updated_at: Mapped[float] = mapped_column(Float)


class LeaseRow(Base):
    """Leader election: one row per lease. `token` grows by one at every change of holder and is
    the fencing token every write of the leader's loop checks in its own transaction."""
    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(255), nullable=True)
    token: Mapped[int] = mapped_column(Integer)
    expires_at: Mapped[float] = mapped_column(Float)


# -- tenancy and API (issue #7) ------------------------------------------------------------------
# Teams and cohorts are seeded from the cluster config on first start; afterwards these rows are
# the truth (admins edit them through the API). `Store.team_configs(config)` merges the two.


class TeamRow(Base):
    __tablename__ = "teams"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    config: Mapped[dict] = mapped_column(JSON)  # TeamConfig fields (quota, cohort, limits, budget)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)  # hides a team the config file has
    updated_at: Mapped[float] = mapped_column(Float)


class CohortRow(Base):
    __tablename__ = "cohorts"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    parent: Mapped[str | None] = mapped_column(String(63), nullable=True)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at: Mapped[float] = mapped_column(Float)


class UserRow(Base):
    __tablename__ = "users"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    team: Mapped[str | None] = mapped_column(String(63), nullable=True)  # None: cluster admin only
    role: Mapped[str] = mapped_column(String(16))  # admin | team-admin | member | viewer
    created_at: Mapped[float] = mapped_column(Float)


class TokenRow(Base):
    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)  # public part, shown in listings
    digest: Mapped[str] = mapped_column(String(64), unique=True)  # HMAC-SHA256(server secret, token)
    user: Mapped[str] = mapped_column(ForeignKey("users.name"), index=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class IdempotencyRow(Base):
    __tablename__ = "idempotency_keys"

    user: Mapped[str] = mapped_column(String(63), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_digest: Mapped[str] = mapped_column(String(64))  # sha256 of the request body
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    created_at: Mapped[float] = mapped_column(Float)
