"""The FastAPI application: everything is wired here, once, when the app starts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response

from service.auth import admit_scraper
from service.body_limit import BodyLimit
from service.capacity import heavy_work
from service.chat.gateway import ServingGateway
from service.chat.router import router as chat_router
from service.config import BaseModelConfig, Settings
from service.console import router as console_router
from service.db import Database, now
from service.embedded_models import ModelBuilds, resolve_base_models
from service.errors import install_error_handlers
from service.files.router import router as files_router
from service.files.service import FileService
from service.files.validator import ProcessValidator
from service.fine_tuning.launcher import Launcher, RayLauncher
from service.fine_tuning.lease import Lease
from service.fine_tuning.reconciler import Reconciler
from service.fine_tuning.registry import PrunedCheckpoint, ReadyModel
from service.fine_tuning.router import router as jobs_router
from service.fine_tuning.service import FineTuningService
from service.fine_tuning.warm_pool import WarmPoolLauncher
from service.graders.router import router as graders_router
from service.graders.service import GraderService
from service.housekeeping import ExpiredOutputs, Housekeeping
from service.local_guard import LocalGuard
from service.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from service.metrics import ServerMetrics
from service.models.router import router as models_router
from service.models.service import ModelService
from service.organization.keys import KeyRing
from service.organization.limits import Limits, RateLimitHeaders
from service.organization.router import router as organization_router
from service.organization.secrets import OrganizationSecrets
from service.ray_cluster import (
    RayCluster,
    connect,
    ray_auth_env,
    ray_log_dir,
    runtime_env_vars,
    use_gpu,
)
from service.startup import one_at_a_time, server_log, startup_step
from service.uploads.router import router as uploads_router
from service.uploads.service import MAX_PART_BYTES, UploadService
from service.webhooks.endpoints import WebhookEndpoints
from service.webhooks.router import router as webhooks_router
from service.webhooks.sender import WebhookSender
from training.native_memory import native_memory_env
from training.storage import ArtifactStore, open_store

logger = logging.getLogger("ftaas")


def adopt_legacy_outputs(settings: Settings) -> None:
    """Release 0.1.0 kept job outputs in `$FTAAS_HOME/jobs`, beside the store: they move
    into the default local store, where their keys (migration 0003) now point."""
    legacy, moved = settings.home / "jobs", Path(settings.resolved_storage_url) / "jobs"
    if settings.storage_url is None and legacy.is_dir() and not moved.exists():
        moved.parent.mkdir(parents=True, exist_ok=True)
        legacy.rename(moved)
        logger.info("moved %s into the artifact store at %s", legacy, moved)


@dataclass
class Runtime:
    """What the app runs on, prepared once before it serves."""

    base_models: dict[str, BaseModelConfig]
    db: Database
    store: ArtifactStore
    cluster: RayCluster
    use_gpu: bool


def prepare_runtime(settings: Settings) -> Runtime:
    """The start-up steps, in order; each fails as one StartupError naming it."""
    with one_at_a_time(settings):
        with startup_step(f"opening the artifact store {settings.resolved_storage_url}", settings):
            adopt_legacy_outputs(settings)
            store = open_store(settings.resolved_storage_url)
            store.check()
        with startup_step("reading the base models", settings):
            base_models = resolve_base_models(settings, store)
        joining = f"joining the Ray cluster at {settings.ray_address}"
        with startup_step(
            joining if settings.ray_address else "starting the embedded Ray head", settings
        ):
            cluster = connect(settings)
            gpus = use_gpu(settings)
        with startup_step("opening the job store", settings):
            db = Database(settings.resolved_database_url)
    return Runtime(base_models, db, store, cluster, gpus)


def _ready_banner(settings: Settings, runtime: Runtime, serving: ServingGateway) -> str:
    lines = [f"ftaas is ready: base_url http://{settings.host}:{settings.port}/v1"]
    for model in runtime.base_models:
        state = serving.state(model) if settings.serving_enabled else "serving disabled"
        lines.append(f"  model {model}: {state}")
    lines.append(f"  state: {settings.home}  (server log: {server_log(settings)})")
    lines.append(f"  Ray: {runtime.cluster.address}, logs in {ray_log_dir(runtime.cluster)}")
    return "\n".join(lines)


# An eager load that takes longer is left to the first request for the model.
EAGER_LOAD_TIMEOUT_S = 120.0


async def run_scheduler(
    reconciler: Reconciler,
    lease: Lease,
    gateway: ServingGateway,
    settings: Settings,
    housekeeping: Housekeeping,
    wake: asyncio.Event,
) -> None:
    """Tick while this process holds the scheduler lease (and sweep, now and then).
    Eager loads of new models and retirements of pruned checkpoints run beside the loop, so
    a busy serving replica never holds jobs back."""
    loads: set[asyncio.Task[None]] = set()
    try:
        while True:
            try:
                if await asyncio.to_thread(lease.hold):
                    expired: list[ExpiredOutputs] = []
                    if housekeeping.due():
                        await asyncio.to_thread(housekeeping.sweep)
                        expired = await asyncio.to_thread(housekeeping.expired_outputs)
                    report = await asyncio.to_thread(reconciler.tick, lease.keep, lease.fence)
                    actions = [
                        *(
                            _eager_load(gateway, m)
                            for m in report.ready
                            if settings.serving_enabled
                        ),
                        *(_prune(gateway, reconciler, p) for p in report.pruned),
                        *(_expire(gateway, housekeeping, e) for e in expired),
                    ]
                    for action in actions:
                        load = asyncio.create_task(action)
                        loads.add(load)
                        load.add_done_callback(loads.discard)
                    if report.queued:  # they start now, on a tick of their own
                        continue
            except Exception:
                logger.exception("scheduler tick failed")
            # A new job (or a resumed one) wakes the scheduler at once.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), settings.scheduler_interval_s)
            wake.clear()
    finally:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(lease.release)


async def _eager_load(gateway: ServingGateway, model: ReadyModel) -> None:
    try:
        await asyncio.wait_for(
            gateway.load_adapter(model.base_model, model.name, model.adapter_dir),
            EAGER_LOAD_TIMEOUT_S,
        )
    except Exception:
        logger.warning("eager load of %s failed; it loads on first use", model.name, exc_info=True)


async def _expire(
    gateway: ServingGateway, housekeeping: Housekeeping, expired: ExpiredOutputs
) -> None:
    """Serving first, files last (service/housekeeping.py)."""
    if expired.names and expired.base_model is not None:
        await gateway.retire_adapters(expired.base_model, expired.names)
    await asyncio.to_thread(housekeeping.delete_outputs, expired)


async def _prune(gateway: ServingGateway, reconciler: Reconciler, pruned: PrunedCheckpoint) -> None:
    """Serving first, files last, as for a deleted model (service/models/router.py)."""
    await gateway.retire_adapters(pruned.base_model, [pruned.name])
    await asyncio.to_thread(reconciler.attempt_store.delete_checkpoint, pruned.path)


def wire_organization(app: FastAPI, settings: Settings, db: Database) -> None:
    """Keys (the environment's registered), limits, secrets and webhooks, on the app's state."""
    keys = KeyRing(db)
    keys.bootstrap(settings.api_key_organizations, settings.admin_key_organizations)
    app.state.keys = keys
    app.state.limits = Limits(settings)
    app.state.secrets = OrganizationSecrets(db)
    app.state.webhooks = WebhookEndpoints(db, settings.webhook_allowed_host_names)
    app.state.heavy = heavy_work()


def create_app(settings: Settings | None = None, runtime: Runtime | None = None) -> FastAPI:
    """The app; `runtime` is what `python -m service serve` prepared before binding, else
    the lifespan prepares it."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ready: Runtime = (
            runtime if runtime is not None else await asyncio.to_thread(prepare_runtime, settings)
        )
        base_models, db, gpus, blobs = ready.base_models, ready.db, ready.use_gpu, ready.store
        auth_env = ray_auth_env(settings)
        trainer_env = runtime_env_vars(auth_env) | native_memory_env(settings.trainer_allocator)
        cold = RayLauncher(ready.cluster.dashboard_url, env=trainer_env)
        launcher: Launcher = cold
        if settings.warm_trainers_per_model:  # one-worker jobs start on warm trainers
            launcher = WarmPoolLauncher(
                cold, blobs, settings.warm_trainers_per_model, settings.warm_trainer_idle_s
            )
        builds = ModelBuilds(settings, blobs, base_models)
        gateway = ServingGateway(
            settings,
            base_models,
            blobs.url,
            gpus,
            env=runtime_env_vars(auth_env),
            ray_logs=ray_log_dir(ready.cluster),
            builds=builds,
        )
        app.state.metrics = ServerMetrics(db, gateway.replica_stats)
        reconciler = Reconciler(
            db,
            settings,
            base_models,
            blobs,
            launcher,
            use_gpu=partial(use_gpu, settings),
            metrics=app.state.metrics,
            model_ready=builds.ready,
            cluster_id=settings.ray_cluster_id,
        )
        app.state.settings = settings
        wire_organization(app, settings, db)
        validator = ProcessValidator()
        limits = app.state.limits
        app.state.files = FileService(db, blobs, settings.max_upload_bytes, validator, limits)
        app.state.uploads = UploadService(db, blobs, app.state.files)
        wake, loop = asyncio.Event(), asyncio.get_running_loop()

        def wake_scheduler() -> None:  # called from the request's worker thread
            loop.call_soon_threadsafe(wake.set)

        app.state.jobs = FineTuningService(
            db,
            base_models,
            reconciler.stop,
            limits,
            on_new_work=wake_scheduler,
        )
        app.state.models = ModelService(
            db,
            base_models,
            now(),
            store=blobs,
            max_adapter_bytes=settings.max_adapter_bytes,
            model_ready=builds.ready,
            limits=limits,
        )
        app.state.gateway = gateway
        lease = Lease(db)
        housekeeping = Housekeeping(
            db, blobs, unfinished_outputs_days=settings.unfinished_outputs_days
        )
        background = [
            asyncio.create_task(
                run_scheduler(reconciler, lease, gateway, settings, housekeeping, wake)
            ),
            asyncio.create_task(WebhookSender(db, settings, app.state.metrics.registry).run()),
        ]
        # Each embedded model is built (once) and then its engine deployed, in the background.
        prepare = gateway.deploy if settings.serving_enabled else builds.ensure_all
        background.append(asyncio.create_task(asyncio.to_thread(prepare)))
        logger.info("%s", _ready_banner(settings, ready, gateway))
        yield
        for task in background:
            task.cancel()
        for task in background:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        validator.close()

    app = FastAPI(title="ftaas", version="0.1.0", lifespan=lifespan)
    app.state.graders = GraderService(settings)
    install_error_handlers(app)
    app.add_middleware(
        BodyLimit,  # type: ignore[arg-type]
        limits=[
            (r"/v1/files", lambda: settings.max_upload_bytes, "file"),
            (r"/v1/uploads/[^/]+/parts", lambda: MAX_PART_BYTES, "data"),
            (r"/v1/.*", lambda: settings.max_request_bytes, None),  # every JSON body
        ],
    )
    app.add_middleware(RateLimitHeaders)  # type: ignore[arg-type]
    # Outermost: refused before any body is read (see service/local_guard.py).
    app.add_middleware(LocalGuard, settings=settings)  # type: ignore[arg-type]
    routers = (
        files_router, uploads_router, jobs_router, models_router, chat_router,
        organization_router, webhooks_router, graders_router, console_router,
    )  # fmt: skip
    for router in routers:
        app.include_router(router)

    @app.get("/health", tags=["health"])
    async def health() -> dict[str, Any]:  # on the event loop: no thread to wait for
        gateway: ServingGateway | None = getattr(app.state, "gateway", None)
        serving = gateway.states() if gateway is not None else {}
        return {"status": "ok", "serving": serving}

    @app.get("/metrics", tags=["health"], response_class=Response)
    def metrics(request: Request) -> Response:
        """Prometheus text format (service/metrics.py), for the operator: it names every
        organization's models, so a server with API keys asks for FTAAS_METRICS_KEY."""
        admit_scraper(settings, app.state.keys, request.headers.get("authorization"))
        return Response(app.state.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    return app
