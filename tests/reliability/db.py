"""Database fixtures: `db_url` runs a test once on SQLite and once on PostgreSQL.

PostgreSQL: one fresh database per test session (`shoal_test_<random>` on the server named by
SHOAL_TEST_PG, default the local one at 127.0.0.1:5432, user postgres), emptied before each test
and dropped at the end. Without a reachable server the PostgreSQL cases are skipped, saying why.
Import the fixtures into a test module: `from tests.reliability.db import db_url, pg_database  # noqa: F401`.
"""
from __future__ import annotations

import os
import uuid

import pytest

PG_SERVER = os.environ.get("SHOAL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def _connect(dbname: str | None = None):
    import psycopg

    conninfo = PG_SERVER if dbname is None else psycopg.conninfo.make_conninfo(PG_SERVER, dbname=dbname)
    return psycopg.connect(conninfo, autocommit=True, connect_timeout=3)


def sqlalchemy_url(dbname: str) -> str:
    import psycopg

    info = psycopg.conninfo.conninfo_to_dict(PG_SERVER)
    host, port, user = info.get("host", "127.0.0.1"), info.get("port", "5432"), info.get("user", "postgres")
    password = f":{info['password']}" if info.get("password") else ""
    return f"postgresql+psycopg://{user}{password}@{host}:{port}/{dbname}"


def _kick(conn, dbname: str) -> None:
    """End connections a test left open to our own database (never anyone else's)."""
    conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                 "AND pid <> pg_backend_pid()", (dbname,))


@pytest.fixture(scope="session")
def pg_database():
    """Name of a fresh PostgreSQL database for this session; skipped if no server answers."""
    try:
        admin = _connect()
    except Exception as e:  # noqa: BLE001 - any connection failure means: no PostgreSQL here
        pytest.skip(f"PostgreSQL not reachable at {PG_SERVER} ({type(e).__name__}: {e}); "
                    "set SHOAL_TEST_PG to a server where user may CREATE DATABASE")
    name = f"shoal_test_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        _kick(admin, name)
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.close()


def reset_pg(name: str) -> None:
    admin = _connect()
    try:
        _kick(admin, name)
    finally:
        admin.close()
    with _connect(name) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """An empty database: SQLite in the test's folder, or the session's PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'shoal.db'}"
        return
    name = request.getfixturevalue("pg_database")
    reset_pg(name)
    yield sqlalchemy_url(name)
    admin = _connect()
    try:
        _kick(admin, name)
    finally:
        admin.close()
