"""Schema migrations (alembic) on SQLite and PostgreSQL: a new database is brought to the newest
revision, the models and the migrations agree (so a model change without a migration fails here),
old pre-migration databases are adopted, and a database from a newer Shoal is refused."""
from __future__ import annotations

import subprocess
import sys

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text

from scheduler.lifecycle import JobState as S
from scheduler.store import SchemaTooNew, SchemaUnknown, Store
from scheduler.store import migrate
from scheduler.store.db import make_engine
from scheduler.store.schema import Base
from tests.reliability.db import db_url, pg_database  # noqa: F401 - fixtures

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def _submit(store, name="x"):
    return store.submit(spec={"name": name}, name=name, team="a", user="u", priority=0, gpus=1,
                        memory_per_gpu_mib=1000, now=1.0)


def test_new_database_is_at_head_and_models_match_migrations(db_url):
    store = Store(db_url)
    try:
        with store.engine.connect() as conn:
            assert migrate.current(conn) == migrate.head()
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        assert diff == [], ("the SQLAlchemy models differ from the migrations; add a migration "
                            f"(see notes/reliability.md): {diff}")
        assert store.lease() is not None and store.lease().token == 0  # seeded by migration 0002
    finally:
        store.close()


def test_reopening_is_idempotent_and_keeps_data(db_url):
    s1 = Store(db_url)
    job = _submit(s1)
    s1.close()
    s2 = Store(db_url)
    try:
        assert s2.get(job.id).state is S.QUEUED
        with s2.engine.connect() as conn:
            versions = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
        assert versions == [migrate.head()]
    finally:
        s2.close()


def test_downgrade_to_base_and_upgrade_again(db_url):
    Store(db_url).close()
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            command.downgrade(migrate.alembic_config(conn), "base")
        with engine.connect() as conn:
            assert migrate.current(conn) is None
        assert migrate.upgrade(engine, db_url) == migrate.head()
    finally:
        engine.dispose()


def test_database_from_a_newer_shoal_is_refused(db_url):
    Store(db_url).close()
    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))
    engine.dispose()
    with pytest.raises(SchemaTooNew, match=r"9999_future.*newer Shoal; upgrade Shoal"):
        Store(db_url)


def test_pre_migration_database_is_adopted(db_url):
    """What `create_all` made before alembic (schema_version 2) is stamped 0001 and upgraded."""
    engine = make_engine(db_url)
    with engine.begin() as conn:
        command.upgrade(migrate.alembic_config(conn), "0001")
        conn.execute(text("DROP TABLE alembic_version"))
        conn.execute(text("INSERT INTO shoal_meta (key, value) VALUES ('schema_version', '2')"))
        conn.execute(text(
            "INSERT INTO jobs (name, team, \"user\", priority, state, spec, gpus, memory_per_gpu_mib, submitted_at, "
            "updated_at, attempt, retries, cancel_requested, attained_gpu_s) VALUES ('old', 'a', 'u', 0, 'QUEUED', "
            "'{}', 1, 10, 1.0, 1.0, 0, 0, false, 0.0)"))
    engine.dispose()
    store = Store(db_url)
    try:
        assert [j.name for j in store.jobs()] == ["old"]
        assert store.nodes() == {}
    finally:
        store.close()


def test_unknown_legacy_schema_is_refused_not_touched(db_url):
    engine = make_engine(db_url)
    with engine.begin() as conn:
        command.upgrade(migrate.alembic_config(conn), "0001")
        conn.execute(text("DROP TABLE alembic_version"))
        conn.execute(text("INSERT INTO shoal_meta (key, value) VALUES ('schema_version', '1')"))
    engine.dispose()
    with pytest.raises(SchemaUnknown, match="schema_version '1'"):
        Store(db_url)


def test_cli_db_upgrade(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    run = lambda: subprocess.run([sys.executable, "-m", "scheduler.cli", "db", "upgrade", "--db", url],  # noqa: E731
                                 cwd=REPO, capture_output=True, text=True, timeout=60)
    first, second = run(), run()
    assert first.returncode == 0, first.stderr
    assert f"revision {migrate.head()} (was None)" in first.stdout
    assert "already current" in second.stdout
