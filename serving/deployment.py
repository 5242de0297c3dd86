"""The Ray Serve deployment: one application per base model, each a vLLM engine with LoRA.

The service reaches it through a deployment handle (no HTTP hop): `respond` streams a head
then SSE strings, and `load_adapter` / `unload_adapter` change what is served without a
restart. A request for an adapter that is not loaded yet loads it first. Adapters are
named by their key in the artifact store: the replica fetches them onto its own node
(`serving.adapter_cache`), and the base model too when it lives in the store.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from serving.adapter_cache import AdapterCache
from serving.engine import EngineConfig, OpenAIEngine, RequestKind, openai_error
from training.node_cache import fetch_model
from training.storage import open_store


def app_name(base_model_id: str) -> str:
    """The Serve application name of a base model (Serve names avoid `/`)."""
    return "llm-" + "".join(c if c.isalnum() or c in "-_." else "-" for c in base_model_id)


@serve.deployment(max_ongoing_requests=64, health_check_period_s=10, health_check_timeout_s=60)
class LLMServer:
    async def __init__(self, config: EngineConfig):  # type: ignore[misc]  # Serve awaits it
        model_path = await asyncio.to_thread(fetch_model, config.model_path)
        self.config = dataclasses.replace(config, model_path=model_path)
        self.adapters = AdapterCache(open_store(config.storage_url), config.adapter_cache_bytes)
        self.adapter_keys: dict[str, str] = {}  # loaded adapter name → its key
        self.engine = await OpenAIEngine.start(self.config)

    async def load_adapter(self, name: str, key: str) -> tuple[int, dict[str, Any]] | None:
        if name in self.adapter_keys:  # loaded already
            return None
        try:
            local, evicted = await asyncio.to_thread(self.adapters.fetch, key)
        except Exception as fetch_error:
            message = f"The model's adapter could not be fetched: {fetch_error}"
            return 500, openai_error(500, message)
        for gone in [n for n, k in self.adapter_keys.items() if k in evicted]:
            await self.unload_adapter(gone)
        error = await self.engine.load_adapter(name, str(local))
        if error is None:
            self.adapter_keys[name] = key
        return error

    async def unload_adapter(self, name: str) -> bool:
        self.adapter_keys.pop(name, None)
        return await self.engine.unload_adapter(name)

    async def loaded_adapters(self) -> list[str]:
        return self.engine.loaded_adapters()

    async def respond(
        self, kind: RequestKind, body: dict[str, Any], adapter: tuple[str, str] | None
    ) -> AsyncIterator[Any]:
        if adapter is not None:
            error = await self.load_adapter(*adapter)
            if error is not None:
                status, error_body = error
                yield {"status": status, "body": error_body, "stream": False}
                return
        async for item in self.engine.respond(kind, body):
            yield item

    async def check_health(self) -> None:
        await self.engine.engine.check_health()

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def build_llm_app(
    config: EngineConfig,
    *,
    num_cpus: float,
    num_gpus: float,
    env: dict[str, str],
    resources: dict[str, float] | None = None,
) -> Any:
    return LLMServer.options(  # type: ignore[attr-defined]
        ray_actor_options={
            "num_cpus": num_cpus,
            "num_gpus": num_gpus,
            "resources": resources or {},
            "runtime_env": {"env_vars": env},
        },
    ).bind(config)
