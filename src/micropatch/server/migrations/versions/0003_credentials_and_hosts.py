"""Credentials, hosts that speak only for themselves, 63-bit versions, and the lock of
the repository.

- `patches.version`, `process_patches.version`, `events.version`: bigint (63-bit
  versions; SQLite's integer is 64-bit already, the declared type changes);
- `users.disabled`: when a user was disabled (its tokens and sessions refused);
- a host's name is unique (hosts enrolled before under a name already taken are
  renamed `NAME~ID`);
- `login_failures`: the login throttle, shared by every server process;
- the `repository` row of `revisions`: taken (FOR UPDATE) by every change of what the
  TUF repository lists, so changes made by several server processes take turns.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

VERSIONS = (("patches", False), ("process_patches", False), ("events", True))


def upgrade() -> None:
    for table, nullable in VERSIONS:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column(
                "version", existing_type=sa.Integer(), type_=sa.BigInteger(),
                existing_nullable=nullable,
            )  # fmt: skip
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(sa.Column("disabled", sa.Float(), nullable=True))

    hosts = sa.table("hosts", sa.column("id", sa.Integer), sa.column("name", sa.String))
    connection = op.get_bind()
    seen: set[str] = set()
    for host_id, name in connection.execute(sa.select(hosts.c.id, hosts.c.name).order_by("id")):
        if name in seen:
            renamed = f"{name[:240]}~{host_id}"
            connection.execute(hosts.update().where(hosts.c.id == host_id).values(name=renamed))
        seen.add(name)
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.create_index("ix_hosts_name", ["name"], unique=True)

    op.create_table(
        "login_failures",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("time", sa.Float(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("address", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("login_failures", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_login_failures_time"), ["time"], unique=False)
        batch_op.create_index(batch_op.f("ix_login_failures_name"), ["name"], unique=False)
        batch_op.create_index(batch_op.f("ix_login_failures_address"), ["address"], unique=False)

    revisions = sa.table("revisions", sa.column("name", sa.String), sa.column("value", sa.Integer))
    op.bulk_insert(revisions, [{"name": "repository", "value": 0}])


def downgrade() -> None:
    op.execute("DELETE FROM revisions WHERE name = 'repository'")
    op.drop_table("login_failures")
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.drop_index("ix_hosts_name")
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("disabled")
    for table, nullable in VERSIONS:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column(
                "version", existing_type=sa.BigInteger(), type_=sa.Integer(),
                existing_nullable=nullable,
            )  # fmt: skip
