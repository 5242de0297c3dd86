"""Alembic owns the schema: a database made by release 0.1.0 (5753cf7, before Alembic)
upgrades in place on start, keeping every row, and the migrations make exactly the schema
the models describe."""

from __future__ import annotations

import shutil
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from service.auth import Tenant
from service.config import tiny_base_model
from service.db import Base, Database
from service.fine_tuning.service import FineTuningService

RELEASE_0_1_DB = Path(__file__).with_name("data") / "ftaas-0.1.0.db"


def test_a_release_0_1_database_upgrades_in_place_with_every_row(tmp_path: Path):
    path = tmp_path / "ftaas.db"
    shutil.copy(RELEASE_0_1_DB, path)
    db = Database(f"sqlite:///{path}")
    jobs = FineTuningService(db, {"ftaas-tiny": tiny_base_model(tmp_path)}, lambda _: None)
    listed, _ = jobs.list(Tenant("org-a"), after=None, limit=100, metadata={})
    assert {job.id: job.status for job in listed} == {
        "ftjob-running00000001": "running",
        "ftjob-pausing00000002": "paused",
        "ftjob-resuming0000003": "queued",
        "ftjob-paused000000004": "paused",
        "ftjob-queued000000005": "queued",
        "ftjob-done00000000006": "succeeded",
    }
    with db.engine.connect() as connection:
        stored = dict(connection.execute(text("SELECT id, status FROM jobs")).all())
        assert stored["ftjob-pausing00000002"] == "pausing"  # the hidden states, explicit
        assert stored["ftjob-resuming0000003"] == "resuming"
        assert connection.execute(text("SELECT count(*) FROM job_events")).scalar() == 3
        assert connection.execute(text("SELECT count(*) FROM models")).scalar() == 1
        # Paths on the API's disk became keys in the artifact store (0003).
        adapter = connection.execute(text("SELECT adapter_dir FROM models")).scalar()
        assert adapter == "jobs/ftjob-done00000000006/attempt-1/adapter"
        resume = connection.execute(text("SELECT resume_from FROM jobs WHERE resume_from != ''"))
        assert resume.scalar() == "jobs/x/attempt-1/checkpoints/step-000003"
    events, _ = jobs.events(Tenant("org-a"), "ftjob-done00000000006", after=None, limit=10)
    assert [e.data["step"] for e in events] == [3, 2, 1]  # type: ignore[index]
    Database(f"sqlite:///{path}")  # a second start migrates nothing and loses nothing
    with db.engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM jobs")).scalar() == 6


def test_migrations_make_exactly_the_schema_the_models_describe(tmp_path: Path):
    db = Database(f"sqlite:///{tmp_path / 'new.db'}")
    with db.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []


def test_the_baseline_is_the_schema_release_0_1_made(tmp_path: Path):
    release = inspect(create_engine(f"sqlite:///{RELEASE_0_1_DB}"))
    baseline_path = tmp_path / "baseline.db"
    engine = create_engine(f"sqlite:///{baseline_path}")
    from alembic import command
    from alembic.config import Config

    from service.db import MIGRATIONS

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
    baseline = inspect(engine)
    for table in release.get_table_names():
        columns = [(c["name"], str(c["type"]), c["nullable"]) for c in release.get_columns(table)]
        assert columns == [
            (c["name"], str(c["type"]), c["nullable"]) for c in baseline.get_columns(table)
        ], table
        indexes = sorted((i["name"], tuple(i["column_names"])) for i in release.get_indexes(table))
        assert indexes == sorted(
            (i["name"], tuple(i["column_names"])) for i in baseline.get_indexes(table)
        ), table


def test_a_release_0_1_postgresql_database_upgrades_in_place(postgres):
    """Release 0.1.0 made its PostgreSQL tables with `create_all`, as the baseline does,
    and kept no `alembic_version`: made so here, with a job in each hidden state."""
    from alembic import command
    from alembic.config import Config

    from service.db import MIGRATIONS

    url = postgres.new_database()
    engine = create_engine(url)
    with engine.begin() as connection:  # back to an empty database, then the release's
        connection.execute(text("DROP SCHEMA public CASCADE"))
        connection.execute(text("CREATE SCHEMA public"))
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
        connection.execute(text("DROP TABLE alembic_version"))
        for job_id, status, submission in (
            ("ftjob-a", "paused", "ftjob-a"),
            ("ftjob-b", "queued", "ftjob-b"),
            ("ftjob-c", "paused", None),
        ):
            connection.execute(
                text(
                    "INSERT INTO jobs (id, organization, created_at, arrival, model, "
                    "training_file, seed, method, status, model_short_id, result_files, "
                    "progress_offset, attempts, ray_submission_id) VALUES (:id, 'org', 1, 1, "
                    "'ftaas-tiny', 'file-x', 1, '{}', :status, :id, '[]', 0, 1, :sid)"
                ),
                {"id": job_id, "status": status, "sid": submission},
            )
    engine.dispose()
    db = Database(url)
    with db.engine.connect() as connection:
        stored = dict(connection.execute(text("SELECT id, status FROM jobs")).all())
        version = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    db.engine.dispose()
    assert stored == {"ftjob-a": "pausing", "ftjob-b": "resuming", "ftjob-c": "paused"}
    assert version == "0009"
