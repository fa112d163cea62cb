"""Patches say which runtime they are for: "native" (machine code in an ELF module)
or "cpython" (Python functions of a module source, docs/python-patches.md).
Existing rows are native.

Revision ID: 0006
Revises: 0004
Create Date: 2026-12-06 21:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("patches", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("runtime", sa.String(length=16), nullable=False, server_default="native")
        )


def downgrade() -> None:
    with op.batch_alter_table("patches", schema=None) as batch_op:
        batch_op.drop_column("runtime")
