"""Durable state. SQLAlchemy on SQLite (embedded default, WAL) or PostgreSQL (`postgresql+psycopg://`);
schema migrations by alembic (scheduler/store/migrations). `MemoryStore` is the same interface in
memory, for the simulator."""
from scheduler.store.db import Conflict, CorruptRow, EventRecord, Fenced, JobRecord, Lease, NodeRecord, Store, UnknownJob
from scheduler.store.memory import MemoryStore
from scheduler.store.migrate import SchemaTooNew, SchemaUnknown
from scheduler.store.tenancy import IdempotencyMismatch, TokenRecord, UserRecord

__all__ = ["Conflict", "CorruptRow", "EventRecord", "Fenced", "IdempotencyMismatch", "JobRecord", "Lease",
           "MemoryStore", "NodeRecord", "SchemaTooNew", "SchemaUnknown", "Store", "TokenRecord", "UnknownJob",
           "UserRecord"]
