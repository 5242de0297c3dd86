"""An API without Ray: the routes, stores and reconciler on a real SQLite file, with a
launcher that runs nothing (tests/service/fakes.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from openai import OpenAI

from service.app import create_app, wire_organization
from service.chat.gateway import ServingGateway
from service.config import Settings, tiny_base_model
from service.db import Database
from service.files.service import FileService
from service.fine_tuning.reconciler import Reconciler
from service.fine_tuning.service import FineTuningService
from service.metrics import ServerMetrics
from service.models.service import ModelService
from service.organization.limits import Limits
from service.uploads.service import UploadService
from tests.service.fakes import FakeLauncher
from training.storage import open_store


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Every service test runs on SQLite and on a real PostgreSQL (a new database each)."""
    database_url = None
    if request.param == "postgresql":
        database_url = request.getfixturevalue("postgres").new_database()
    return Settings(home=tmp_path, serving_enabled=False, database_url=database_url)


@pytest.fixture
def parts(settings: Settings):  # type: ignore[no-untyped-def]
    base_models = {"ftaas-tiny": tiny_base_model(settings.home)}
    db = Database(settings.resolved_database_url)
    blobs = open_store(settings.resolved_storage_url)
    limits = Limits(settings)
    files = FileService(db, blobs, max_upload_bytes=10_000, limits=limits)
    launcher = FakeLauncher()
    metrics = ServerMetrics(db)
    reconciler = Reconciler(db, settings, base_models, blobs, launcher, metrics=metrics)
    yield {
        "db": db,
        "blobs": blobs,
        "base_models": base_models,
        "files": files,
        "uploads": UploadService(db, blobs, files),
        "jobs": FineTuningService(db, base_models, reconciler.stop, limits),
        "models": ModelService(db, base_models, started_at=0, store=blobs, limits=limits),
        "reconciler": reconciler,
        "launcher": launcher,
        "limits": limits,
        "metrics": metrics,
    }
    db.engine.dispose()


def api_client(settings: Settings, parts) -> TestClient:  # type: ignore[no-untyped-def]
    """A client of the app wired to `parts`; no `with`, so the lifespan (Ray, serving)
    does not run."""
    app = create_app(settings)
    app.state.settings = settings
    app.state.files = parts["files"]
    app.state.uploads = parts["uploads"]
    app.state.jobs = parts["jobs"]
    app.state.models = parts["models"]
    # Serving is off: the gateway deploys and retires nothing.
    app.state.gateway = ServingGateway(settings, parts["base_models"], parts["blobs"].url)
    app.state.metrics = parts["metrics"]
    wire_organization(app, settings, parts["db"])
    app.state.limits = parts["limits"]  # the one the services count with
    # A client on this machine, as open access requires (service/local_guard.py).
    return TestClient(app, base_url="http://127.0.0.1", client=("127.0.0.1", 50000))


@pytest.fixture
def client(settings: Settings, parts) -> TestClient:  # type: ignore[no-untyped-def]
    return api_client(settings, parts)


@pytest.fixture
def sdk(client: TestClient) -> OpenAI:
    """The official SDK talking to the app in-process (TestClient is an httpx.Client)."""
    return OpenAI(base_url="http://127.0.0.1/v1", api_key="k", http_client=client, max_retries=0)
