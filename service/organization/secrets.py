"""Secrets an organization registers for its own jobs: today its W&B API key.

The operator's own W&B key is never used for tenants: a job logs to W&B only with the key
its organization registered. The scheduler hands the key to that job's trainer through an
object in the artifact store (never the Ray job's `runtime_env`, which the dashboard and
the job API show), and the trainer's driver deletes it when the attempt ends.
"""

from __future__ import annotations

from typing import Any

from service.db import Database, OrganizationSecretRow, now
from service.organization.keys import redact

WANDB = "wandb"


class OrganizationSecrets:
    def __init__(self, db: Database):
        self.db = db

    def put(self, organization: str, name: str, value: str, settings: dict[str, Any]) -> None:
        with self.db.session() as session:
            row = session.get(OrganizationSecretRow, (organization, name))
            if row is None:
                session.add(
                    OrganizationSecretRow(
                        organization=organization, name=name, value=value, settings=settings
                    )
                )
            else:
                row.value, row.settings, row.created_at = value, settings, now()

    def get(self, organization: str, name: str) -> OrganizationSecretRow | None:
        with self.db.session() as session:
            return session.get(OrganizationSecretRow, (organization, name))

    def delete(self, organization: str, name: str) -> bool:
        with self.db.session() as session:
            row = session.get(OrganizationSecretRow, (organization, name))
            if row is None:
                return False
            session.delete(row)
            return True


def described(row: OrganizationSecretRow) -> dict[str, Any]:
    """What the API shows of a registered secret: never the secret."""
    return {
        "object": "organization.integration",
        "type": row.name,
        "api_key": redact(row.value),
        "created_at": row.created_at,
        **(row.settings or {}),
    }
