"""Schema migrations (alembic), run programmatically: `Store` upgrades the database to the newest
revision when it opens it, and `shoal db upgrade` does the same explicitly.

A database written by a newer Shoal (a revision this code does not know) is refused with a clear
error rather than touched. Databases created before migrations existed (tables + a
`shoal_meta.schema_version` stamp of 2) are adopted as revision 0001 and upgraded from there.
On PostgreSQL the upgrade holds an advisory lock, so replicas starting together migrate once.
"""
from __future__ import annotations

import logging
from pathlib import Path

logging.getLogger("alembic").setLevel(logging.WARNING)  # its INFO lines (some at import) would fill shoal.log

from alembic import command  # noqa: E402
from alembic.config import Config  # noqa: E402
from alembic.runtime.migration import MigrationContext  # noqa: E402
from alembic.script import ScriptDirectory  # noqa: E402
from sqlalchemy import inspect, text  # noqa: E402
from sqlalchemy.engine import Connection, Engine  # noqa: E402

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_PG_LOCK = 0x5A0A1  # advisory lock key for migrations (any constant shared by all replicas)


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer Shoal than this one."""


class SchemaUnknown(RuntimeError):
    """The database has tables Shoal cannot place in its migration history."""


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def _check_known(conn: Connection, url: str) -> None:
    rev = current(conn)
    scripts = ScriptDirectory.from_config(alembic_config())
    if rev is not None and rev not in {s.revision for s in scripts.walk_revisions()}:
        raise SchemaTooNew(
            f"database {url} is at schema revision {rev}, which this Shoal does not know (its newest "
            f"is {scripts.get_current_head()}): it was migrated by a newer Shoal; upgrade Shoal"
        )


def _adopt_legacy(conn: Connection, url: str) -> None:
    """Tables made by `create_all` before migrations: stamp them as 0001 (what they are)."""
    names = set(inspect(conn).get_table_names())
    if "alembic_version" in names or "jobs" not in names:
        return
    version = None
    if "shoal_meta" in names:
        version = conn.execute(text("SELECT value FROM shoal_meta WHERE key = 'schema_version'")).scalar()
    if version != "2":
        raise SchemaUnknown(
            f"database {url} has Shoal tables but no migration history and schema_version {version!r} "
            "(expected 2): it was made by a pre-release Shoal; move it aside and start with a new database"
        )
    command.stamp(alembic_config(conn), "0001")


def upgrade(engine: Engine, url: str) -> str:
    """Bring the database to the newest revision; returns it. Idempotent and cheap when current."""
    target = head()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK})
        _check_known(conn, url)
        if current(conn) == target:
            return target
        _adopt_legacy(conn, url)
        command.upgrade(alembic_config(conn), "head")
    return target
