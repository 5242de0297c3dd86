"""The service's door to serving: deploys one Serve application per base model and talks
to it through deployment handles. Ray and vLLM stay behind this class: the service passes
plain dicts and gets plain dicts (or SSE strings) back.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from service.config import BaseModelConfig, Settings
from service.errors import ServiceUnavailable
from service.models.service import InferenceTarget

logger = logging.getLogger(__name__)

HEALTHY_APP_STATES = {"RUNNING", "DEPLOYING"}


class ServingGateway:
    def __init__(
        self,
        settings: Settings,
        base_models: dict[str, BaseModelConfig],
        use_gpu: bool = False,
    ):
        self.settings = settings
        self.base_models = base_models
        self.use_gpu = use_gpu

    def deploy(self) -> None:
        """Start every base model's application that is not already running (blocking)."""
        from ray import serve

        from serving.deployment import app_name, build_llm_app
        from serving.engine import EngineConfig

        serve.start(proxy_location="Disabled")
        existing = serve.status().applications
        for base in self.base_models.values():
            name = app_name(base.id)
            if name in existing and str(existing[name].status) in HEALTHY_APP_STATES:
                logger.info("serving application %s already running", name)
                continue
            config = EngineConfig(
                model_id=base.id,
                model_path=base.path,
                max_model_len=base.max_length,
                max_lora_rank=base.max_lora_rank,
                max_loras=base.max_loras,
                dtype=base.dtype,
                chat_template=base.chat_template,
            )
            app = build_llm_app(
                config,
                num_cpus=1,
                num_gpus=1 if self.use_gpu else 0,
                env={"VLLM_CPU_KVCACHE_SPACE": str(self.settings.serving_kv_cache_gb)},
            )
            logger.info("deploying serving application %s", name)
            serve.run(app, name=name, route_prefix=None)

    def _handle(self, base_model: str) -> Any:
        from ray import serve

        from serving.deployment import app_name

        try:
            return serve.get_app_handle(app_name(base_model))
        except Exception as error:
            raise ServiceUnavailable(
                f"The model `{base_model}` is still loading; try again shortly.",
                param="model",
                code="model_loading",
            ) from error

    async def respond(
        self, kind: str, target: InferenceTarget, body: dict[str, Any]
    ) -> tuple[dict[str, Any], AsyncIterator[str]]:
        """The reply's head (status, body or stream flag), and the stream's SSE strings."""
        adapter = (target.adapter_name, target.adapter_dir) if target.adapter_name else None
        body = {**body, "model": target.adapter_name or target.base_model}
        handle = self._handle(target.base_model).options(stream=True)
        replies = handle.respond.remote(kind, body, adapter).__aiter__()
        head = await replies.__anext__()
        return head, replies

    async def load_adapter(self, base_model: str, name: str, adapter_dir: str) -> None:
        error = await self._handle(base_model).load_adapter.remote(name, adapter_dir)
        if error is not None:
            logger.error("serving could not load %s: %s", name, error)

    async def unload_adapter(self, base_model: str, name: str) -> None:
        if self.settings.serving_enabled:
            await self._handle(base_model).unload_adapter.remote(name)
