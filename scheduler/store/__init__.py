"""Durable state. SQLAlchemy on SQLite (embedded default, WAL) or PostgreSQL (`postgresql+psycopg://`)."""
from scheduler.store.db import Conflict, JobRecord, EventRecord, Store, UnknownJob
from scheduler.store.memory import MemoryStore

__all__ = ["Conflict", "EventRecord", "JobRecord", "MemoryStore", "Store", "UnknownJob"]
