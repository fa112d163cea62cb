"""Alembic environment of the server's database: run by `database.migrate` (`server run`
migrates on start), with the connection it was handed."""

from __future__ import annotations

from alembic import context

from micropatch.server.models import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "the server's migrations run through micropatch.server.database.migrate "
        "(`micropatch server run` or `micropatch server migrate`), not the alembic command"
    )
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
