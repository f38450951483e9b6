"""Durable state. SQLAlchemy on SQLite (embedded default, WAL) or PostgreSQL (`postgresql+psycopg://`)."""
from scheduler.store.db import Conflict, JobRecord, EventRecord, Store, UnknownJob
from scheduler.store.tenancy import DrainRecord, IdempotencyMismatch, TokenRecord, UserRecord

__all__ = ["Conflict", "DrainRecord", "EventRecord", "IdempotencyMismatch", "JobRecord", "Store", "TokenRecord",
           "UnknownJob", "UserRecord"]
