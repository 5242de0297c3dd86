"""A real PostgreSQL server for the tests, started from Debian's binaries in a temporary
folder (as a user would run one), on a free port, and stopped at the end of the session.

`initdb` refuses to run as root: when the tests run as root, the server runs as the
`postgres` system user that Debian's package creates. Each test gets a new database,
copied from a template that already holds the migrated schema (fast: no migrations per
test).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import sqlalchemy as sa

TEMPLATE = "ftaas_template"


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version)
    return Path(found[-1]).parent if found else None


def _version(path: str) -> int:
    try:
        return int(Path(path).parts[-3])
    except ValueError:
        return 0


class PostgresServer:
    def __init__(self, bin_dir: Path, port: int):
        self.bin_dir, self.port = bin_dir, port
        # /tmp itself, not pytest's 0700 folders: the postgres user must reach it.
        self.root = Path(tempfile.mkdtemp(prefix="ftaas-pg-"))
        self.data = self.root / "data"
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")
            os.chown(self.root, account.pw_uid, account.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]

    def _run(self, *command: str) -> None:
        subprocess.run([*self.as_user, *command], check=True, capture_output=True, cwd="/")

    def start(self) -> None:
        self._run(
            str(self.bin_dir / "initdb"),
            "-D", str(self.data), "-U", "ftaas", "--auth=trust", "--no-sync", "-E", "UTF8",
        )  # fmt: skip
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=200"
        )
        self._run(
            str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-o", options,
            "-l", str(self.root / "server.log"), "-w", "start",
        )  # fmt: skip

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://ftaas@127.0.0.1:{self.port}/{database}"

    def make_template(self) -> None:
        """A database migrated once; `new_database` copies it."""
        from service.db import Database

        self._execute(f'CREATE DATABASE "{TEMPLATE}"')
        Database(self.url(TEMPLATE)).engine.dispose()

    def new_database(self) -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        self._execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE}"')
        return self.url(name)

    def _execute(self, statement: str) -> None:
        engine = sa.create_engine(self.url(), isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            connection.execute(sa.text(statement))
        engine.dispose()

    def stop(self) -> None:
        try:
            self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "stop")
        finally:
            time.sleep(0.1)
            shutil.rmtree(self.root, ignore_errors=True)
