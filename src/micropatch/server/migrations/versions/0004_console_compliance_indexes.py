"""Compliance counted by the database: `host_modules` indexed by (build_id, host_id)
and (sha256, build_id, host_id), covering the console's joins from a patch's module identity
to the hosts that load it (`server/fleet/compliance.py`); they replace the indexes
on build_id and sha256 alone, which they serve as well.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 20:40:00
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_host_modules_build_id_host", "host_modules", ["build_id", "host_id"])
    op.create_index(
        "ix_host_modules_sha256_host", "host_modules", ["sha256", "build_id", "host_id"]
    )
    op.drop_index("ix_host_modules_build_id", table_name="host_modules")
    op.drop_index("ix_host_modules_sha256", table_name="host_modules")


def downgrade() -> None:
    op.create_index("ix_host_modules_build_id", "host_modules", ["build_id"])
    op.create_index("ix_host_modules_sha256", "host_modules", ["sha256"])
    op.drop_index("ix_host_modules_build_id_host", table_name="host_modules")
    op.drop_index("ix_host_modules_sha256_host", table_name="host_modules")
