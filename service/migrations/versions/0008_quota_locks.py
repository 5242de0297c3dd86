"""One row per organization that every quota check writes first (`quota_locks`), so that
two requests can no longer both count, both find room, and together exceed a limit.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "quota_locks",
        sa.Column("organization", sa.String(128), primary_key=True),
        sa.Column("checks", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("quota_locks")
