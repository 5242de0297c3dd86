"""`python -m service keys …`: the operator manages any organization's API keys.

    python -m service keys create --organization acme [--name ci] [--admin]
    python -m service keys list [--organization acme] [--revoked]
    python -m service keys revoke key_…

It works on the job store (`FTAAS_DATABASE_URL`, or SQLite under `FTAAS_HOME`) directly,
so it runs with or without a server; a running server sees a change on its next request.
A created key is printed once, and only its hash is stored.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime

from service.config import Settings
from service.db import ApiKeyRow, Database
from service.organization.keys import ADMIN, MEMBER, KeyRing, valid_organization


def _when(moment: int | None) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%d %H:%M") if moment else "-"


def _row(row: ApiKeyRow) -> str:
    state = f"revoked {_when(row.revoked_at)}" if row.revoked_at else "active"
    return (
        f"{row.id}  {row.organization:<20} {row.role:<6} {row.redacted_value:<28} "
        f"{row.name[:24]:<24} created {_when(row.created_at)}  last used "
        f"{_when(row.last_used_at)}  {state}"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service keys",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="action", required=True)
    create = commands.add_parser("create", help="make a key and print it once")
    create.add_argument("--organization", required=True)
    create.add_argument("--name", default="made by the operator")
    create.add_argument("--admin", action="store_true", help="an admin key (/v1/organization)")
    listing = commands.add_parser("list", help="keys, by prefix only")
    listing.add_argument("--organization")
    listing.add_argument("--revoked", action="store_true", help="revoked keys too")
    revoke = commands.add_parser("revoke", help="revoke a key by its id (key_…)")
    revoke.add_argument("key_id")
    args = parser.parse_args(argv)

    settings = Settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    keys = KeyRing(Database(settings.resolved_database_url))
    if args.action == "create":
        if not valid_organization(args.organization):
            print(
                "An organization name is 1 to 128 letters, digits, '_', '.' or '-'.",
                file=sys.stderr,
            )
            return 2
        row, value = keys.create(
            args.organization, args.name[:256], ADMIN if args.admin else MEMBER
        )
        print(value)
        print(
            f"{row.id}: {row.role} key of {row.organization}. It is shown only now: keep "
            "it somewhere safe.",
            file=sys.stderr,
        )
        return 0
    if args.action == "list":
        for row in keys.list(args.organization, include_revoked=args.revoked):
            print(_row(row))
        return 0
    revoked = keys.revoke(None, args.key_id)
    if revoked is None:
        print(f"No active key {args.key_id}.", file=sys.stderr)
        return 1
    print(f"Revoked {revoked.id} ({revoked.organization}, {revoked.redacted_value}).")
    return 0
