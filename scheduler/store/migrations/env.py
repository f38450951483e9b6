"""Alembic environment. Shoal runs migrations programmatically (Store open, `shoal db upgrade`):
the caller passes an open connection in `config.attributes["connection"]`. Run from the alembic
CLI (`alembic -c scheduler/store/alembic.ini ...`), the URL comes from `sqlalchemy.url` or
SHOAL_DB_URL."""
from __future__ import annotations

import os

from alembic import context
from sqlalchemy import create_engine

from scheduler.store.schema import Base

config = context.config
target_metadata = Base.metadata


def _run(connection) -> None:
    context.configure(
        connection=connection, target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite ALTERs go through table copies
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = os.environ.get("SHOAL_DB_URL") or config.get_main_option("sqlalchemy.url")
    engine = create_engine(url)
    with engine.connect() as conn:
        _run(conn)
    engine.dispose()


if context.is_offline_mode():
    context.configure(url=os.environ.get("SHOAL_DB_URL") or config.get_main_option("sqlalchemy.url"),
                      target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_online()
