"""How the scheduler and the list endpoints grow with the store: one scheduler tick, and
`GET /v1/fine_tuning/jobs` and `GET /v1/files?limit=100`, with 1,000 and 10,000 jobs and
100,000 files, on SQLite and on PostgreSQL (started here from Debian's package).

A tenth of the jobs are open (queued behind a full cluster: `max_running_jobs` 0); the
rest have finished. The launcher runs nothing, so a tick's Ray calls (one per running
job, with a 10 s timeout each) are not in these figures. Each figure is the median of
several runs; the last column is the ratio of 10,000 jobs to 1,000 (10x the rows).

    .venv/bin/python bench/scheduler_scale.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import insert

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings, tiny_base_model
from service.db import Database, FileRow, JobRow
from service.files.service import FileService
from service.fine_tuning.reconciler import Reconciler
from service.fine_tuning.service import FineTuningService
from service.models.service import ModelService
from service.ray_cluster import free_port
from tests.postgres import PostgresServer, postgres_bin
from tests.service.fakes import FakeLauncher
from training.storage import LocalStore

ORG = "org-bench"
METHOD = {
    "type": "supervised",
    "supervised": {
        "hyperparameters": {
            "n_epochs": "auto",
            "batch_size": "auto",
            "learning_rate_multiplier": "auto",
        }
    },
}


def fill(db: Database, jobs: int, files: int) -> None:
    base = time.time_ns()
    with db.engine.begin() as connection:
        for start in range(0, files, 5000):
            connection.execute(
                insert(FileRow),
                [
                    {
                        "id": f"file-{i:08d}", "organization": ORG, "filename": "t.jsonl",
                        "purpose": "fine-tune", "bytes": 1000, "created_at": 1, "arrival": base + i,
                        "status": "processed", "blob_key": f"files/file-{i:08d}",
                        "n_examples": 12, "data_format": "chat",
                    }
                    for i in range(start, min(files, start + 5000))
                ],
            )  # fmt: skip
        for start in range(0, jobs, 5000):
            connection.execute(
                insert(JobRow),
                [
                    {
                        "id": f"ftjob-{i:08d}", "organization": ORG, "created_at": 1,
                        "arrival": base + i, "model": "ftaas-tiny",
                        "training_file": "file-00000000", "seed": i, "method": METHOD,
                        "status": "queued" if i % 10 == 0 else "succeeded",
                        "model_short_id": f"s{i:08d}", "result_files": [], "progress_offset": 0,
                        "attempts": 0, "step_failures": 0, "version": 1,
                    }
                    for i in range(start, min(jobs, start + 5000))
                ],
            )  # fmt: skip


def median_ms(action: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def measure(url: str, home: Path, jobs: int, files: int, repeat: int) -> dict[str, float]:
    settings = Settings(home=home, serving_enabled=False, database_url=url, max_running_jobs=0)
    db = Database(url)
    fill(db, jobs, files)
    base_models = {"ftaas-tiny": tiny_base_model(home)}
    blobs = LocalStore(home / "blobs")
    reconciler = Reconciler(db, settings, base_models, blobs, FakeLauncher())
    app = create_app(settings)
    app.state.settings = settings
    app.state.files = FileService(db, blobs, settings.max_upload_bytes)
    app.state.jobs = FineTuningService(db, base_models, reconciler.stop)
    app.state.models = ModelService(db, base_models, started_at=0)
    client = TestClient(app)
    result = {
        "tick": median_ms(reconciler.tick, repeat),
        "jobs": median_ms(lambda: client.get("/v1/fine_tuning/jobs").raise_for_status(), repeat),
        "files": median_ms(lambda: client.get("/v1/files?limit=100").raise_for_status(), repeat),
    }
    db.engine.dispose()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    stores: list[tuple[str, Callable[[], str]]] = []
    work = Path(tempfile.mkdtemp(prefix="ftaas-scale-"))
    stores.append(("sqlite", lambda: f"sqlite:///{work / f'{time.time_ns()}.db'}"))
    postgres = None
    bin_dir = postgres_bin()
    if bin_dir is not None:
        postgres = PostgresServer(bin_dir, free_port())
        postgres.start()
        postgres.make_template()
        stores.append(("postgresql", postgres.new_database))
    else:
        print("PostgreSQL is not installed: SQLite only")
    try:
        print(f"{'store':11} {'measure':28} {'1,000 jobs':>11} {'10,000 jobs':>12} {'ratio':>6}")
        for name, new_url in stores:
            small = measure(new_url(), work / f"{name}-1k", 1_000, 100_000, args.repeat)
            large = measure(new_url(), work / f"{name}-10k", 10_000, 100_000, args.repeat)
            for key, label in (
                ("tick", "scheduler tick (10% open)"),
                ("jobs", "GET /v1/fine_tuning/jobs"),
                ("files", "GET /v1/files?limit=100"),
            ):
                print(
                    f"{name:11} {label:28} {small[key]:9.1f}ms {large[key]:10.1f}ms "
                    f"{large[key] / small[key]:5.1f}x"
                )
    finally:
        if postgres is not None:
            postgres.stop()


if __name__ == "__main__":
    main()
