"""The job store: SQLAlchemy tables for files, jobs, events, checkpoints and models.

SQLite by default, any SQLAlchemy URL (PostgreSQL) by configuration. Every row carries
its organization; every query in the services filters on it. Alembic migrations
(`service/migrations`) own the schema: every start upgrades the database in place.

A job row has a version: every UPDATE of it is `... WHERE id = :id AND version = :read`,
so a writer that read a job before another writer changed it fails (StaleDataError) and
retries on what is there now, instead of overwriting it (a cancel is never undone by a
scheduler that read the job before it).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    create_engine,
    event,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)


def changed_rows(result: Any) -> int:
    """Rows an UPDATE or DELETE changed (a CursorResult's rowcount, untyped by Session)."""
    return int(result.rowcount)


def now() -> int:
    return int(time.time())


def arrival() -> int:
    """Nanoseconds since the epoch: orders rows made within the same second (created_at is
    whole seconds, as OpenAI's is, and ids are random)."""
    return time.time_ns()


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


class FileRow(Base):
    __tablename__ = "files"
    __table_args__ = (Index("ix_files_organization_arrival", "organization", "arrival"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    organization: Mapped[str] = mapped_column(String(128), index=True)
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    arrival: Mapped[int] = mapped_column(BigInteger, default=arrival, index=True)
    status: Mapped[str] = mapped_column(String(16))
    status_details: Mapped[str | None] = mapped_column(Text, default=None)
    blob_key: Mapped[str] = mapped_column(String(512))
    n_examples: Mapped[int | None] = mapped_column(Integer, default=None)
    data_format: Mapped[str | None] = mapped_column(String(32), default=None)


class UploadRow(Base):
    """A large file arriving in parts (OpenAI's Uploads API)."""

    __tablename__ = "uploads"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    organization: Mapped[str] = mapped_column(String(128), index=True)
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    mime_type: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    expires_at: Mapped[int] = mapped_column(BigInteger)
    file_id: Mapped[str | None] = mapped_column(String(64), default=None)


class UploadPartRow(Base):
    __tablename__ = "upload_parts"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    upload_id: Mapped[str] = mapped_column(ForeignKey("uploads.id"), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    bytes: Mapped[int] = mapped_column(BigInteger)
    blob_key: Mapped[str] = mapped_column(String(512))


class JobRow(Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_organization_arrival", "organization", "arrival"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    organization: Mapped[str] = mapped_column(String(128), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now, index=True)
    arrival: Mapped[int] = mapped_column(BigInteger, default=arrival, index=True)
    model: Mapped[str] = mapped_column(String(256))  # the base model
    # Training on top of a tuned model: the `ft:` model or checkpoint the user named, and
    # the adapter (a key in the artifact store) the new one starts from.
    parent_model: Mapped[str | None] = mapped_column(String(512), default=None)
    start_adapter: Mapped[str | None] = mapped_column(Text, default=None)
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64), default=None)
    suffix: Mapped[str | None] = mapped_column(String(64), default=None)
    seed: Mapped[int] = mapped_column(BigInteger)
    method: Mapped[dict[str, Any]] = mapped_column(JSON)
    resolved_hyperparameters: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    job_metadata: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    integrations: Mapped[list[Any] | None] = mapped_column(JSON, default=None)
    status: Mapped[str] = mapped_column(String(32), index=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(512), default=None)
    model_short_id: Mapped[str] = mapped_column(String(16), unique=True)
    finished_at: Mapped[int | None] = mapped_column(BigInteger, default=None)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger, default=None)
    estimated_finish: Mapped[int | None] = mapped_column(BigInteger, default=None)
    result_files: Mapped[list[Any]] = mapped_column(JSON, default=list)
    output_dir: Mapped[str | None] = mapped_column(Text, default=None)
    progress_offset: Mapped[int] = mapped_column(BigInteger, default=0)
    ray_submission_id: Mapped[str | None] = mapped_column(String(96), default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # The checkpoint folder the next attempt continues from (set by pause and epochs).
    resume_from: Mapped[str | None] = mapped_column(Text, default=None)
    pause_requested_at: Mapped[int | None] = mapped_column(BigInteger, default=None)
    # When the scheduler asked the launcher to stop the trainer (pause grace, cancel).
    stop_requested_at: Mapped[int | None] = mapped_column(BigInteger, default=None)
    # Consecutive scheduler steps of this job that raised; the job fails at a bound.
    step_failures: Mapped[int] = mapped_column(Integer, default=0)
    # Runs the scheduler started again by itself because Ray lost the job (bounded), and
    # when Ray was first seen not to know it (it is lost once that lasts).
    lost_runs: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    lost_seen_at: Mapped[int | None] = mapped_column(BigInteger, default=None)
    # The Ray cluster the current attempt was submitted to (Settings.cluster_id).
    cluster_id: Mapped[str | None] = mapped_column(String(255), default=None)
    # When a failed or cancelled job's outputs (checkpoints, logs) were deleted.
    outputs_expired_at: Mapped[int | None] = mapped_column(BigInteger, default=None)
    # What a finished job's outputs hold in the store (the storage quota counts it);
    # None: not measured yet (housekeeping measures it).
    output_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    version: Mapped[int] = mapped_column(Integer, default=1)

    __mapper_args__ = {"version_id_col": version}  # noqa: RUF012


class EventRow(Base):
    __tablename__ = "job_events"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    level: Mapped[str] = mapped_column(String(8), default="info")
    message: Mapped[str] = mapped_column(Text)
    type: Mapped[str] = mapped_column(String(16), default="message")
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)


class CheckpointRow(Base):
    __tablename__ = "job_checkpoints"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    organization: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    step_number: Mapped[int] = mapped_column(Integer)
    model_name: Mapped[str] = mapped_column(String(512), unique=True)
    path: Mapped[str] = mapped_column(Text)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)


class ModelRow(Base):
    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(512), primary_key=True)
    organization: Mapped[str] = mapped_column(String(128), index=True)
    base_model: Mapped[str] = mapped_column(String(256))
    job_id: Mapped[str | None] = mapped_column(String(64), default=None)  # None: imported
    adapter_dir: Mapped[str] = mapped_column(Text)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    # An imported adapter's bytes in the store (the storage quota counts them; a tuned
    # model's are its job's `output_bytes`).
    bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)


class ApiKeyRow(Base):
    """An API key, stored as its SHA-256 only (keys are 256 random bits: a slow hash
    would add nothing), so neither the database nor a backup of it holds a usable key."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    organization: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str] = mapped_column(String(256))
    role: Mapped[str] = mapped_column(String(16))  # "member" or "admin"
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    redacted_value: Mapped[str] = mapped_column(String(64))
    # "managed" (made by an admin or the operator) or "environment" (FTAAS_API_KEYS).
    source: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    arrival: Mapped[int] = mapped_column(BigInteger, default=arrival)
    last_used_at: Mapped[int | None] = mapped_column(BigInteger, default=None)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger, default=None, index=True)


class OrganizationSecretRow(Base):
    """A secret an organization registered for its own jobs (its W&B API key): read only
    by the scheduler, which hands it to that organization's trainers alone."""

    __tablename__ = "organization_secrets"

    organization: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    settings: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class QuotaLockRow(Base):
    """One row per organization that ever added something a quota counts: every quota
    check writes it first (`lock_quotas`), so the check and the insert it allows happen
    under this row's lock, one request of the organization at a time."""

    __tablename__ = "quota_locks"

    organization: Mapped[str] = mapped_column(String(128), primary_key=True)
    checks: Mapped[int] = mapped_column(BigInteger, default=0)


def lock_quotas(session: Session, organization: str) -> None:
    """Hold the organization's quota row until `session`'s transaction ends.

    A check that counts rows and then inserts one is atomic only if no other check of the
    same organization runs between the two. The row is written (an upsert), not just
    selected: on PostgreSQL that takes its row lock (a second request waits for the first
    to commit, then counts what it added); on SQLite (pysqlite begins a transaction at the
    first write, not at a SELECT) it takes the database's write lock before the counts."""
    dialect = session.get_bind().dialect.name
    if dialect in ("postgresql", "sqlite"):
        from sqlalchemy.dialects.postgresql import insert as pg_insert
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        upsert = (pg_insert if dialect == "postgresql" else sqlite_insert)(QuotaLockRow)
        session.execute(
            upsert.values(organization=organization, checks=1).on_conflict_do_update(
                index_elements=[QuotaLockRow.organization],
                set_={"checks": QuotaLockRow.checks + 1},
            )
        )
        return
    bump = (
        update(QuotaLockRow)
        .where(QuotaLockRow.organization == organization)
        .values(checks=QuotaLockRow.checks + 1)
    )
    if changed_rows(session.execute(bump)) == 0:
        session.add(QuotaLockRow(organization=organization, checks=1))
        session.flush()


class LeaseRow(Base):
    """Who runs the scheduler: one holder at a time, taken over once it expires."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[float] = mapped_column(Float)
    # Up by one each time another holder takes the lease: the fencing token.
    generation: Mapped[int] = mapped_column(Integer, default=1, server_default="1")


class WebhookEndpointRow(Base):
    """A URL an organization's admin registered for its jobs' webhooks (service/webhooks).
    The signing secret is kept as is: every delivery is signed with it."""

    __tablename__ = "webhook_endpoints"
    __table_args__ = (
        Index("ix_webhook_endpoints_organization_arrival", "organization", "arrival"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    organization: Mapped[str] = mapped_column(String(128))
    url: Mapped[str] = mapped_column(String(2048))
    events: Mapped[list[Any]] = mapped_column(JSON)
    secret: Mapped[str] = mapped_column(Text)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    arrival: Mapped[int] = mapped_column(BigInteger, default=arrival)
    # Set when the receiver answered 410 Gone: nothing more is sent to it.
    disabled_at: Mapped[int | None] = mapped_column(BigInteger, default=None)
    disabled_reason: Mapped[str | None] = mapped_column(Text, default=None)


class WebhookEventRow(Base):
    """An event of the outbox, written in the transaction of the change it tells of; `body`
    is the exact JSON every attempt sends (and signs)."""

    __tablename__ = "webhook_events"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    organization: Mapped[str] = mapped_column(String(128))
    type: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    body: Mapped[str] = mapped_column(Text)


class WebhookDeliveryRow(Base):
    """One event to one endpoint: its id is the `webhook-id` header of every attempt."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    event_id: Mapped[str] = mapped_column(ForeignKey("webhook_events.id"), index=True)
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("webhook_endpoints.id"), index=True)
    organization: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16))  # pending, succeeded or failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column(Float)
    # A sender holds the delivery until then; once past, another sender may take it.
    claimed_until: Mapped[float | None] = mapped_column(Float, default=None)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    arrival: Mapped[int] = mapped_column(BigInteger, default=arrival)
    completed_at: Mapped[int | None] = mapped_column(BigInteger, default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    # Never loaded through (lazy="raise"): it orders a flush's INSERTs, the event first.
    event: Mapped[WebhookEventRow] = relationship(lazy="raise")


class WebhookAttemptRow(Base):
    """One POST of a delivery: the receiver's status code, or why there was none."""

    __tablename__ = "webhook_attempts"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(ForeignKey("webhook_deliveries.id"), index=True)
    attempted_at: Mapped[float] = mapped_column(Float)
    status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    duration_ms: Mapped[int] = mapped_column(Integer)


def make_engine(url: str) -> Engine:
    connect_args = {"check_same_thread": False, "timeout": 30} if url.startswith("sqlite") else {}
    engine = create_engine(url, connect_args=connect_args, pool_pre_ping=True)
    if url.startswith("sqlite"):

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection: Any, _record: Any) -> None:
            # WAL lets the scheduler write while requests read; fsync on every commit
            # keeps what was accepted across a crash.
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.close()

    migrate(engine)
    return engine


MIGRATIONS = Path(__file__).with_name("migrations")
# The first revision: the schema release 0.1.0 made with `create_all`, before Alembic.
BASELINE = "0001"
# PostgreSQL advisory lock key: one process migrates at a time ("ftaas" in ASCII).
MIGRATION_LOCK = 0x6674616173


def migrate(engine: Engine) -> None:
    """Upgrade the schema to the newest revision, in one transaction.

    A database made by release 0.1.0 has its tables and no `alembic_version`: it is
    stamped at the baseline first, then upgraded like any other."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        _lock_for_migration(connection)
        config.attributes["connection"] = connection
        tables = set(inspect(connection).get_table_names())
        if "jobs" in tables and "alembic_version" not in tables:
            command.stamp(config, BASELINE)
        command.upgrade(config, "head")


def _lock_for_migration(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})


def lock_jobs_of_new_events(session: Session, _context: Any, _instances: Any) -> None:
    """Before a flush inserts events, lock their jobs' rows (FOR NO KEY UPDATE, held until
    commit; in job-id order, so two flushes never wait on each other crosswise).

    An event's `seq` comes from one sequence for all jobs, drawn at INSERT, while the
    transaction commits later: on PostgreSQL a transaction that drew seq 7 can commit after
    one that drew 8, and a client that read 8 and 6 before 7 committed never sees 7: it is
    older than the newest the client polled, newer than the `after` it pages on from.
    Under the job's row lock a job's events are drawn one writing transaction at a time,
    each drawing only after the previous one committed: within a job, `seq` order is
    commit order, and an event that is visible has every event of its job with a smaller
    `seq` visible too. A writer that also changes the job (most do) waited on that row at
    its UPDATE anyway; now it takes it before its events, not after. SQLite has one writer
    at a time: its rowids are in commit order already (FOR UPDATE is not emitted there)."""
    jobs = sorted({row.job_id for row in session.new if isinstance(row, EventRow)})
    if jobs:
        session.execute(
            select(JobRow.id)
            .where(JobRow.id.in_(jobs))
            .order_by(JobRow.id)
            .with_for_update(key_share=True)
        )


class Database:
    def __init__(self, url: str):
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        event.listen(self._sessions, "before_flush", lock_jobs_of_new_events)
        from service.webhooks.outbox import write_job_webhooks  # it imports this module

        event.listen(self._sessions, "before_flush", write_job_webhooks)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as session, session.begin():
            yield session
