"""Explicit job states, a version per job for compare-and-set, bounded step retries, the
scheduler's lease, and (organization, arrival) indexes for the list endpoints.

Release 0.1.0 kept two states hidden in `(status, ray_submission_id)`: a `paused` job with
a live Ray submission was still pausing, and a `queued` one had been resumed while its
trainer was still pausing. They become `pausing` and `resuming`.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:
        jobs.add_column(
            sa.Column("step_failures", sa.Integer(), nullable=False, server_default="0")
        )
        jobs.add_column(sa.Column("version", sa.Integer(), nullable=False, server_default="1"))
        jobs.add_column(sa.Column("stop_requested_at", sa.BigInteger(), nullable=True))
    op.create_table(
        "leases",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(128), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_jobs_organization_arrival", "jobs", ["organization", "arrival"])
    op.create_index("ix_files_organization_arrival", "files", ["organization", "arrival"])
    op.execute(
        "UPDATE jobs SET status = 'pausing' "
        "WHERE status = 'paused' AND ray_submission_id IS NOT NULL"
    )
    op.execute(
        "UPDATE jobs SET status = 'resuming' "
        "WHERE status = 'queued' AND ray_submission_id IS NOT NULL"
    )


def downgrade() -> None:
    op.execute("UPDATE jobs SET status = 'paused' WHERE status = 'pausing'")
    op.execute("UPDATE jobs SET status = 'queued' WHERE status IN ('resuming', 'starting')")
    op.execute("UPDATE jobs SET status = 'running' WHERE status = 'cancelling'")
    op.drop_index("ix_files_organization_arrival", "files")
    op.drop_index("ix_jobs_organization_arrival", "jobs")
    op.drop_table("leases")
    with op.batch_alter_table("jobs") as jobs:
        jobs.drop_column("stop_requested_at")
        jobs.drop_column("version")
        jobs.drop_column("step_failures")
