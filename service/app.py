"""The FastAPI application: everything is wired here, once, when the app starts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.blobs import LocalBlobStore
from service.body_limit import BodyLimit
from service.chat.gateway import ServingGateway
from service.chat.router import router as chat_router
from service.config import BaseModelConfig, Settings
from service.db import Database, now
from service.errors import install_error_handlers
from service.files.router import router as files_router
from service.files.service import FileService
from service.fine_tuning.ray_jobs import RayJobs
from service.fine_tuning.router import router as jobs_router
from service.fine_tuning.scheduler import Scheduler
from service.fine_tuning.service import FineTuningService
from service.models.router import router as models_router
from service.models.service import ModelService
from service.ray_cluster import connect, use_gpu
from service.uploads.router import router as uploads_router
from service.uploads.service import MAX_PART_BYTES, UploadService
from training.tiny_model import TINY_MODEL_ID

logger = logging.getLogger("ftaas")


def ensure_base_models(settings: Settings) -> dict[str, BaseModelConfig]:
    base_models = {m.id: m for m in settings.load_base_models()}
    tiny = base_models.get(TINY_MODEL_ID)
    if tiny is not None and settings.base_models_file is None:
        # In a child process: the API process itself never imports torch.
        subprocess.run([sys.executable, "-m", "training.tiny_model", tiny.path], check=True)
    return base_models


async def run_scheduler(scheduler: Scheduler, gateway: ServingGateway, settings: Settings) -> None:
    while True:
        try:
            ready = await asyncio.to_thread(scheduler.tick)
            for model in ready if settings.serving_enabled else []:
                try:
                    await gateway.load_adapter(model.base_model, model.name, model.adapter_dir)
                except Exception:
                    logger.warning("eager load of %s failed", model.name, exc_info=True)
        except Exception:
            logger.exception("scheduler tick failed")
        await asyncio.sleep(settings.scheduler_interval_s)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.home.mkdir(parents=True, exist_ok=True)
        base_models = await asyncio.to_thread(ensure_base_models, settings)
        db = Database(settings.resolved_database_url)
        blobs = LocalBlobStore(settings.home / "blobs")
        cluster = await asyncio.to_thread(connect, settings)
        gpus = await asyncio.to_thread(use_gpu, settings)
        ray_jobs = RayJobs(cluster.dashboard_url)
        scheduler = Scheduler(db, settings, base_models, blobs, ray_jobs, use_gpu=gpus)
        gateway = ServingGateway(settings, base_models, use_gpu=gpus)
        app.state.settings = settings
        app.state.files = FileService(db, blobs, settings.max_upload_bytes)
        app.state.uploads = UploadService(db, blobs, app.state.files)
        app.state.jobs = FineTuningService(db, base_models, scheduler.stop)
        app.state.models = ModelService(db, base_models, started_at=now())
        app.state.gateway = gateway
        background = [asyncio.create_task(run_scheduler(scheduler, gateway, settings))]
        if settings.serving_enabled:
            background.append(asyncio.create_task(asyncio.to_thread(gateway.deploy)))
        logger.info("ftaas is serving %s", ", ".join(base_models))
        yield
        for task in background:
            task.cancel()
        for task in background:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    app = FastAPI(title="ftaas", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(
        BodyLimit,  # type: ignore[arg-type]
        limits=[
            (r"/v1/files", lambda: settings.max_upload_bytes),
            (r"/v1/uploads/[^/]+/parts", lambda: MAX_PART_BYTES),
        ],
    )
    for router in (files_router, uploads_router, jobs_router, models_router, chat_router):
        app.include_router(router)

    @app.get("/health", tags=["health"])
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
