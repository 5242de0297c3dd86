"""The scheduler's fencing: the lease's `generation`, which goes up each time another
process takes the lease over, and every write of a tick checks it in its own transaction;
and the Ray cluster a job's attempt was submitted to (`jobs.cluster_id`), so that a
scheduler on another cluster (an upgrade's new one) follows that attempt through the store
instead of taking Ray's "unknown" for the job lost.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("leases") as leases:
        leases.add_column(sa.Column("generation", sa.Integer(), nullable=False, server_default="1"))
    with op.batch_alter_table("jobs") as jobs:
        jobs.add_column(sa.Column("cluster_id", sa.String(255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:
        jobs.drop_column("cluster_id")
    with op.batch_alter_table("leases") as leases:
        leases.drop_column("generation")
