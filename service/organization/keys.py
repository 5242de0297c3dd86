"""API keys: made here, stored hashed, shown once, revoked for good.

A key is 256 random bits behind a prefix that says what it is (`sk-ftaas-…`, admin keys
`sk-ftaas-admin-…`). Only its SHA-256 is stored: finding a key is an index lookup on the
hash, so the time an answer takes says nothing about how close a guess was. Keys are read
from the database on every request, so a revoked key fails on the next one, whichever
API process revoked it.

`FTAAS_API_KEYS` (and `FTAAS_ADMIN_KEYS`) are a bootstrap: those keys are registered on
start, and one removed from the variable is removed with it. A key revoked through the API
stays revoked (its row stays), whatever the variable says later.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from service.db import ApiKeyRow, Database, now
from service.ids import random_id

Role = Literal["member", "admin"]
MEMBER: Role = "member"
ADMIN: Role = "admin"
KEY_PREFIX = {MEMBER: "sk-ftaas-", ADMIN: "sk-ftaas-admin-"}
# Organization names go into model names (`ft:base:org:…`) and headers: kept plain.
ORGANIZATION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# last_used_at is written at most this often per key: not a database write per request.
LAST_USED_RESOLUTION_S = 60


def hash_key(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def redact(value: str) -> str:
    """What a listing shows of a key: enough to tell keys apart, never enough to use one."""
    if len(value) < 24:  # a short key from the environment: show none of it
        return f"...({len(value)} characters)"
    prefix = next((p for p in sorted(KEY_PREFIX.values(), key=len, reverse=True)
                   if value.startswith(p)), "")  # fmt: skip
    return f"{prefix}{value[len(prefix) : len(prefix) + 4]}...{value[-4:]}"


def valid_organization(name: str) -> bool:
    return bool(ORGANIZATION_NAME.match(name))


@dataclass(frozen=True)
class KeyHolder:
    """Who a presented key belongs to."""

    key_id: str
    organization: str
    role: Role


class KeyRing:
    def __init__(self, db: Database):
        self.db = db
        self._keyed = False

    # --- asking
    def open_access(self) -> bool:
        """No key was ever made: the server is one developer's (service/local_guard.py).
        Revoking every key does not open it again: that would serve anyone as `local`.
        Once keyed, a process stays keyed without asking the database again."""
        if self._keyed:
            return False
        with self.db.session() as session:
            self._keyed = session.scalars(select(ApiKeyRow.id).limit(1)).first() is not None
        return not self._keyed

    def authenticate(self, value: str) -> KeyHolder | None:
        digest = hash_key(value)
        with self.db.session() as session:
            row = session.scalars(
                select(ApiKeyRow).where(
                    ApiKeyRow.key_hash == digest, ApiKeyRow.revoked_at.is_(None)
                )
            ).first()
            if row is None:
                return None
            moment = now()
            if row.last_used_at is None or moment - row.last_used_at >= LAST_USED_RESOLUTION_S:
                row.last_used_at = moment
            return KeyHolder(row.id, row.organization, row.role)  # type: ignore[arg-type]

    # --- managing
    def create(self, organization: str, name: str, role: Role = MEMBER) -> tuple[ApiKeyRow, str]:
        """A new key: its row, and its value (shown once, never stored)."""
        value = KEY_PREFIX[role] + secrets.token_urlsafe(32)
        return self._add(value, organization, name, role, "managed"), value

    def _add(self, value: str, organization: str, name: str, role: Role, source: str) -> ApiKeyRow:
        row = ApiKeyRow(
            id=random_id("key_"),
            organization=organization,
            name=name,
            role=role,
            key_hash=hash_key(value),
            redacted_value=redact(value),
            source=source,
        )
        with self.db.session() as session:
            session.add(row)
        return row

    def list(self, organization: str | None, include_revoked: bool = False) -> list[ApiKeyRow]:
        """Oldest first; every organization's when `organization` is None (the operator)."""
        query = select(ApiKeyRow).order_by(ApiKeyRow.arrival)
        if organization is not None:
            query = query.where(ApiKeyRow.organization == organization)
        if not include_revoked:
            query = query.where(ApiKeyRow.revoked_at.is_(None))
        with self.db.session() as session:
            return list(session.scalars(query).all())

    def get(self, organization: str | None, key_id: str) -> ApiKeyRow | None:
        with self.db.session() as session:
            return _active_of(session.get(ApiKeyRow, key_id), organization)

    def revoke(self, organization: str | None, key_id: str) -> ApiKeyRow | None:
        with self.db.session() as session:
            row = _active_of(session.get(ApiKeyRow, key_id), organization)
            if row is not None:
                row.revoked_at = now()
            return row

    # --- the environment's keys
    def bootstrap(self, members: dict[str, str], admins: dict[str, str]) -> None:
        """Register `key → organization` pairs from the environment; remove environment keys
        that are no longer there. A key revoked by an admin is not brought back."""
        try:
            self._bootstrap(members, admins)
        except IntegrityError:  # another process starting registered the same key first
            self._bootstrap(members, admins)

    def _bootstrap(self, members: dict[str, str], admins: dict[str, str]) -> None:
        wanted = {hash_key(k): (k, org, MEMBER) for k, org in members.items()}
        wanted |= {hash_key(k): (k, org, ADMIN) for k, org in admins.items()}
        with self.db.session() as session:
            known = {row.key_hash: row for row in session.scalars(select(ApiKeyRow)).all()}
            for digest, row in known.items():
                if row.source == "environment" and digest not in wanted and not row.revoked_at:
                    # Gone with the variable (an unset FTAAS_API_KEYS of a developer's
                    # machine is open access again, as before keys were managed). A revoked
                    # key stays, so the variable naming it again does not bring it back.
                    session.delete(row)
            for digest, (value, organization, role) in wanted.items():
                existing = known.get(digest)
                if existing is None:
                    session.add(
                        ApiKeyRow(
                            id=random_id("key_"),
                            organization=organization,
                            name="from the environment",
                            role=role,
                            key_hash=digest,
                            redacted_value=redact(value),
                            source="environment",
                        )
                    )
                elif existing.source == "environment" and existing.revoked_at is None:
                    existing.organization, existing.role = organization, role


def _active_of(row: ApiKeyRow | None, organization: str | None) -> ApiKeyRow | None:
    """The key if it is active and `organization`'s (any, for the operator): another
    organization's key does not exist for this one."""
    if row is None or row.revoked_at is not None:
        return None
    if organization is not None and row.organization != organization:
        return None
    return row
