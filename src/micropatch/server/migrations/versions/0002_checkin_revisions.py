"""Cheap check-ins: the host's inventory digest, and the policy revision counter.

`hosts.inventory_digest` is the digest of the inventory (modules and patched
processes) the server holds for the host: an agent whose inventory has not
changed sends only the digest. `revisions` holds counters that every change of
what check-ins share (groups, policies, patches) bumps in its own transaction,
so a server process knows when to rebuild what it caches (server/catalogue.py).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 01:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("inventory_digest", sa.String(length=128), nullable=True))
    op.create_table(
        "revisions",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("value", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    revisions = sa.table("revisions", sa.column("name", sa.String), sa.column("value", sa.Integer))
    op.bulk_insert(revisions, [{"name": "policy", "value": 0}])


def downgrade() -> None:
    op.drop_table("revisions")
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.drop_column("inventory_digest")
