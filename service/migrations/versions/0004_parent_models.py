"""Jobs that train on top of a tuned model: the model the user named (`parent_model`, an
`ft:` model or a checkpoint) and the adapter the new one starts from (`start_adapter`, a
key in the artifact store). `model` stays the base model. Models imported from an
uploaded adapter have no job (`models.job_id` may be null).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:
        jobs.add_column(sa.Column("parent_model", sa.String(512), nullable=True))
        jobs.add_column(sa.Column("start_adapter", sa.Text(), nullable=True))
    with op.batch_alter_table("models") as models:
        models.alter_column("job_id", existing_type=sa.String(64), nullable=True)


def downgrade() -> None:
    # Imported models have no job: the older schema cannot hold them.
    op.execute(sa.text("DELETE FROM models WHERE job_id IS NULL"))
    with op.batch_alter_table("models") as models:
        models.alter_column("job_id", existing_type=sa.String(64), nullable=False)
    with op.batch_alter_table("jobs") as jobs:
        jobs.drop_column("start_adapter")
        jobs.drop_column("parent_model")
