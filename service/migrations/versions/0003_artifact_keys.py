"""Artifacts by key: what the job store names (adapters, checkpoints, attempt folders, the
checkpoint a job resumes from) becomes a key in the artifact store instead of a path on
the API's disk, so that any node can find it.

Release 0.1.0 wrote `<FTAAS_HOME>/jobs/<job>/attempt-N/...`; the key is the part from
`jobs/` on. On start, a local store adopts the old `<FTAAS_HOME>/jobs` folder (see
`service.app.adopt_legacy_outputs`), so every adapter stays servable.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

COLUMNS = {
    "jobs": ("output_dir", "resume_from"),
    "models": ("adapter_dir",),
    "job_checkpoints": ("path",),
}


def as_key(value: str | None) -> str | None:
    if value is None or not value.startswith("/") or "/jobs/" not in value:
        return value
    return "jobs/" + value.rsplit("/jobs/", 1)[1]


def upgrade() -> None:
    connection = op.get_bind()
    tables = set(sa.inspect(connection).get_table_names())
    for table, columns in COLUMNS.items():
        if table not in tables:
            continue
        rows = sa.table(table, sa.column("id"), *(sa.column(c) for c in columns))
        for row in connection.execute(sa.select(rows)).all():
            values = {c: as_key(getattr(row, c)) for c in columns}
            if values != {c: getattr(row, c) for c in columns}:
                connection.execute(rows.update().where(rows.c.id == row.id).values(**values))


def downgrade() -> None:
    raise NotImplementedError("artifact keys cannot name a path on a disk again")
