"""The service's door to serving: deploys one Serve application per base model and talks
to it through deployment handles. Ray and vLLM stay behind this class: the service passes
plain dicts and gets plain dicts (or SSE strings) back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from service.config import BaseModelConfig, Settings
from service.embedded_models import ModelBuilds
from service.errors import RateLimited, ServiceUnavailable
from service.models.service import InferenceTarget
from service.startup import one_line

logger = logging.getLogger(__name__)

HEALTHY_APP_STATES = {"RUNNING", "DEPLOYING"}
# Control calls to a replica (load, unload an adapter) wait at most this long.
SERVING_CALL_TIMEOUT_S = 60.0
# Deleting a model waits this long for every replica to stop serving it (a replica retires
# an adapter within a post or two, serving/deployment.py) before its files go anyway.
RETIRE_TIMEOUT_S = 30.0
RETIRE_POLL_S = 0.1
# A replica that posted within this long is live (they post every 0.5 s).
RETIRE_LIVE_S = 3.0
# A scrape of /metrics waits this long for the replicas' snapshots.
STATS_READ_TIMEOUT_S = 2.0
# What a client told to retry a full serving queue waits (the SDK honours retry-after).
OVERLOADED_RETRY_AFTER_S = 1
WARMING_UP = "engine warming up (chat answers 503 until it is ready)"
BUILDING = "building the model from its package (chat answers 503 until it is ready)"
READY = "ready"


def _status_name(status: object) -> str:
    """Serve's ApplicationStatus is a str enum: `str()` gives `ApplicationStatus.RUNNING`."""
    return str(getattr(status, "value", status))


def engine_cache_env(settings: Settings) -> dict[str, str]:
    """vLLM and torch keep compiled kernels and usage stats under the home directory and a
    shared temp folder by default; ftaas keeps them with its own state (so a restart reuses
    them and nothing else can), and sends no usage stats."""
    cache = settings.home / "cache"
    return {
        "VLLM_CACHE_ROOT": str(cache / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "torchinductor"),
        "TRITON_CACHE_DIR": str(cache / "triton"),
        "VLLM_CONFIG_ROOT": str(cache / "vllm-config"),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }


def replica_options(base: BaseModelConfig) -> dict[str, Any]:
    """Serve's replica settings of a base model: a fixed count, or autoscaling bounds."""
    if base.autoscaling is None:
        return {"num_replicas": base.num_replicas}
    return {"autoscaling_config": base.autoscaling.model_dump()}


def _deployed_with(name: str) -> str | None:
    """The configuration fingerprint a running application's replica reports; None from
    a replica of an older version, which has none to report."""
    from ray import serve

    try:
        handle = serve.get_app_handle(name)
        return str(handle.deployed_with.remote().result(timeout_s=60))
    except Exception:
        logger.info("serving application %s reports no configuration", name, exc_info=True)
        return None


def _wait_until_running(name: str, timeout_s: float = 900) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications.get(name)
        state = _status_name(status.status) if status is not None else "MISSING"
        if state == "RUNNING":
            return
        if state != "DEPLOYING" or time.monotonic() > deadline:
            raise RuntimeError(f"serving application {name} is {state}")
        time.sleep(1)


class ServingGateway:
    def __init__(
        self,
        settings: Settings,
        base_models: dict[str, BaseModelConfig],
        storage_url: str,
        use_gpu: bool = False,
        env: dict[str, str] | None = None,
        ray_logs: str = "the Ray cluster's logs",
        builds: ModelBuilds | None = None,
    ):
        self.settings = settings
        self.base_models = base_models
        self.storage_url = storage_url
        self.use_gpu = use_gpu
        # Variables every replica gets (Ray's token authentication among them).
        self.env = env or {}
        self.ray_logs = ray_logs
        self.builds = builds  # embedded models are built before their engine starts
        self._states = {
            model: WARMING_UP if builds is None or builds.ready(model) else BUILDING
            for model in base_models
        }
        self._handles: dict[str, Any] = {}

    def state(self, base_model: str) -> str:
        return self._states.get(base_model, "unknown")

    def states(self) -> dict[str, str]:
        return dict(self._states)

    def deploy(self) -> None:
        """Start every base model's application that is not already running (blocking),
        each once it is built (an embedded model; configured ones are ready).

        A base model that fails to build or deploy is reported (log and /health); the
        others and the rest of the API keep working."""
        from ray import serve

        try:
            serve.start(proxy_location="Disabled")
            existing = serve.status().applications
        except Exception as error:  # Serve itself did not start: every engine is down
            reason = one_line(error)
            for model in self.base_models:
                self._states[model] = f"engine failed to start: Ray Serve: {reason}"
            logger.error("starting Ray Serve failed: %s", reason, exc_info=True)
            if self.builds is not None:  # training needs the models all the same
                self.builds.ensure_all()
            return
        for base in self.base_models.values():
            started = time.monotonic()
            try:
                if self.builds is not None and not self.builds.ready(base.id):
                    self.builds.ensure(base.id)
                    self._states[base.id] = WARMING_UP
                self._deploy_one(base, existing)
            except Exception as error:
                reason = one_line(error)
                self._states[base.id] = f"engine failed to start: {reason}"
                logger.error(
                    "deploying the engine for %s failed: %s (logs: %s, serve/ and worker-*)",
                    base.id,
                    reason,
                    self.ray_logs,
                    exc_info=True,
                )
                continue
            self._states[base.id] = READY
            logger.info("model %s: ready (%.0f s)", base.id, time.monotonic() - started)

    def _deploy_one(self, base: BaseModelConfig, existing: dict[str, Any]) -> None:
        from ray import serve

        from serving.deployment import app_fingerprint, build_llm_app
        from serving.engine import EngineConfig
        from serving.names import app_name

        name = app_name(base.id)
        config = EngineConfig(
            model_id=base.id,
            model_path=base.path,
            max_model_len=base.max_length,
            max_lora_rank=base.max_lora_rank,
            max_loras=base.max_loras,
            max_cpu_loras=base.max_cpu_loras,
            dtype=base.dtype,
            chat_template=base.chat_template,
            storage_url=self.storage_url,
            adapter_cache_bytes=base.adapter_cache_bytes or self.settings.adapter_cache_bytes,
            max_adapters_per_replica=base.max_adapters_per_replica,
            allowed_media_domains=self.settings.media_domains,
            tool_call_parser=base.tool_call_parser,
        )
        options: dict[str, Any] = {
            "num_cpus": 1,
            "num_gpus": 1 if self.use_gpu else 0,
            "env": {
                **self.env,
                **engine_cache_env(self.settings),
                "VLLM_CPU_KVCACHE_SPACE": str(self.settings.serving_kv_cache_gb),
            },
            "replicas": replica_options(base),
            "max_ongoing_requests": base.max_ongoing_requests,
            "max_queued_requests": base.max_queued_requests,
            "resources": self.settings.serving_resources,
        }
        fingerprint = app_fingerprint(config, options)
        if name in existing and _status_name(existing[name].status) in HEALTHY_APP_STATES:
            _wait_until_running(name)  # still DEPLOYING after a restart during the first one
            running = _deployed_with(name)
            if running == fingerprint:
                logger.info(
                    "serving application %s already running: reusing it (configuration %s)",
                    name,
                    fingerprint,
                )
                return
            # The API restarted on a head that outlived it, with another configuration: a
            # reused engine would refuse ranks the API admits, or serve another template.
            logger.info(
                "serving application %s runs configuration %s, not %s: deploying it again",
                name,
                running or "unknown",
                fingerprint,
            )
        app = build_llm_app(config, fingerprint=fingerprint, **options)
        logger.info("deploying serving application %s (configuration %s)", name, fingerprint)
        serve.run(app, name=name, route_prefix=None)

    async def _handle(self, base_model: str) -> Any:
        """The base model's Serve handle, made once (making one asks the Serve controller,
        a blocking call) and then shared by every request."""
        handle = self._handles.get(base_model)
        if handle is not None:
            return handle
        if not self.settings.serving_enabled:
            raise ServiceUnavailable(
                "This server does not serve models (FTAAS_SERVING_ENABLED is false).",
                param="model",
                code="serving_disabled",
            )
        import ray
        from ray import serve

        if not ray.is_initialized():
            # Serve would start a Ray of its own in this process (ray.init's default): a
            # cluster nobody stops, whose loss later ends the process.
            raise ServiceUnavailable(
                f"The model `{base_model}` is still loading; try again shortly.",
                param="model",
                code="model_loading",
            )

        from serving.names import app_name

        try:
            handle = await asyncio.to_thread(serve.get_app_handle, app_name(base_model))
        except Exception as error:
            raise ServiceUnavailable(
                f"The model `{base_model}` is still loading; try again shortly.",
                param="model",
                code="model_loading",
            ) from error
        self._handles[base_model] = handle
        return handle

    async def respond(
        self, kind: str, target: InferenceTarget, body: dict[str, Any]
    ) -> tuple[dict[str, Any], AsyncIterator[Any]]:
        """The reply's head (status, body or stream flag, stats), and for streams the SSE
        strings then a `{"stats"}` dict. A tuned model's call goes, by its adapter's name,
        to a replica that holds the adapter (serving/deployment.py). Cancelled while
        waiting for the head (the client went away), the replica's call is cancelled."""
        from ray.serve.exceptions import BackPressureError

        adapter = (target.adapter_name, target.adapter_key) if target.adapter_name else None
        body = {**body, "model": target.adapter_name or target.base_model}
        handle = (await self._handle(target.base_model)).options(
            stream=True, multiplexed_model_id=target.adapter_name or ""
        )
        replies = handle.respond.remote(kind, body, adapter)
        try:
            head = await replies.__anext__()
        except BackPressureError:
            raise RateLimited(
                f"The model `{target.base_model}` is receiving more requests than its "
                "replicas can take. Please try again shortly.",
                code="engine_overloaded",
                headers={
                    "retry-after": str(OVERLOADED_RETRY_AFTER_S),
                    "retry-after-ms": str(OVERLOADED_RETRY_AFTER_S * 1000),
                },
            ) from None
        except BaseException:
            replies.cancel()
            raise
        return head, replies

    async def load_adapter(self, base_model: str, name: str, adapter_key: str) -> None:
        """Register a new model's adapter on the replica its requests will be routed to."""
        handle = (await self._handle(base_model)).options(multiplexed_model_id=name)
        error = await handle.load_adapter.remote(name, adapter_key)
        if error is not None:
            logger.error("serving could not load %s: %s", name, error)

    async def retire_adapters(self, base_model: str, names: list[str]) -> None:
        """Stop serving deleted models' adapters on every replica of `base_model`: returns
        once each live replica has confirmed that none of them is registered, registering
        or generating there any more, so their files can go ("serving first, files last":
        vLLM reloads adapters from their files mid-step, fatally when they are gone). A
        replica that has not confirmed within RETIRE_TIMEOUT_S is logged and not waited
        for. The API stops routing to the names first (their rows are gone)."""
        import ray

        if not self.settings.serving_enabled or not names or not ray.is_initialized():
            return  # nothing serves them (and Serve's calls would start a Ray of their own)
        from serving.stats import board, confirmed

        deadline, pending = time.monotonic() + RETIRE_TIMEOUT_S, list[str]()
        try:
            announced = await asyncio.to_thread(board)
            stamp = await asyncio.wait_for(announced.retire.remote(names), STATS_READ_TIMEOUT_S)
            while time.monotonic() < deadline:
                # Only replicas still posting: one that stopped cannot serve them either.
                live = await asyncio.wait_for(
                    announced.read.remote(RETIRE_LIVE_S), STATS_READ_TIMEOUT_S
                )
                pending = [
                    s["replica"]
                    for s in live
                    if s["base_model"] == base_model and not confirmed(s, stamp)
                ]
                if not pending:
                    return
                await asyncio.sleep(RETIRE_POLL_S)
            logger.warning(
                "replicas %s did not confirm that %s are retired within %.0f s",
                pending,
                names,
                RETIRE_TIMEOUT_S,
            )
        except (ray.exceptions.RayError, TimeoutError):
            logger.warning("could not retire %s from serving", names, exc_info=True)

    def replica_stats(self) -> list[dict[str, Any]]:
        """Every live replica's latest snapshot (blocking: /metrics runs in a thread)."""
        import ray

        if not self.settings.serving_enabled or not ray.is_initialized():
            return []
        from serving.stats import board

        return list(ray.get(board().read.remote(), timeout=STATS_READ_TIMEOUT_S))
