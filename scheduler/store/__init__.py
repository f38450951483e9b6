"""Durable state. SQLAlchemy on SQLite (embedded default, WAL) or PostgreSQL (`postgresql+psycopg://`)."""
from scheduler.store.db import Conflict, JobRecord, EventRecord, Store, UnknownJob

__all__ = ["Conflict", "EventRecord", "JobRecord", "Store", "UnknownJob"]
