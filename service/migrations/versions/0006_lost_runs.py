"""Runs of a job the scheduler started again by itself because Ray lost it, counted apart
from the user's resumes (`lost_runs`, bounded), and when Ray was first seen not to know
the running job (`lost_seen_at`: it must still not know it a while later); when a failed
or cancelled job's outputs were deleted (`outputs_expired_at`); and the bytes a finished
job's outputs and an imported adapter hold in the store, which the storage quota counts
(`jobs.output_bytes`, `models.bytes`).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:
        jobs.add_column(sa.Column("lost_runs", sa.Integer(), nullable=False, server_default="0"))
        jobs.add_column(sa.Column("lost_seen_at", sa.BigInteger(), nullable=True))
        jobs.add_column(sa.Column("outputs_expired_at", sa.BigInteger(), nullable=True))
        jobs.add_column(sa.Column("output_bytes", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("models") as models:
        models.add_column(sa.Column("bytes", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("models") as models:
        models.drop_column("bytes")
    with op.batch_alter_table("jobs") as jobs:
        jobs.drop_column("output_bytes")
        jobs.drop_column("outputs_expired_at")
        jobs.drop_column("lost_seen_at")
        jobs.drop_column("lost_runs")
