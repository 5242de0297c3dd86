"""The Ray Serve deployment: one application per base model, each a vLLM engine with LoRA.

The service reaches it through a deployment handle (no HTTP hop): `respond` streams a head
then SSE strings, and `load_adapter` / `unload_adapter` change what is served without a
restart. A request for an adapter that is not loaded yet loads it first.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from serving.engine import EngineConfig, OpenAIEngine, RequestKind


def app_name(base_model_id: str) -> str:
    """The Serve application name of a base model (Serve names avoid `/`)."""
    return "llm-" + "".join(c if c.isalnum() or c in "-_." else "-" for c in base_model_id)


@serve.deployment(max_ongoing_requests=64, health_check_period_s=10, health_check_timeout_s=60)
class LLMServer:
    async def __init__(self, config: EngineConfig):  # type: ignore[misc]  # Serve awaits it
        self.config = config
        self.engine = await OpenAIEngine.start(config)

    async def load_adapter(self, name: str, path: str) -> tuple[int, dict[str, Any]] | None:
        return await self.engine.load_adapter(name, path)

    async def unload_adapter(self, name: str) -> bool:
        return await self.engine.unload_adapter(name)

    async def loaded_adapters(self) -> list[str]:
        return self.engine.loaded_adapters()

    async def respond(
        self, kind: RequestKind, body: dict[str, Any], adapter: tuple[str, str] | None
    ) -> AsyncIterator[Any]:
        if adapter is not None:
            error = await self.engine.load_adapter(*adapter)
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
    config: EngineConfig, *, num_cpus: float, num_gpus: float, env: dict[str, str]
) -> Any:
    return LLMServer.options(  # type: ignore[attr-defined]
        ray_actor_options={
            "num_cpus": num_cpus,
            "num_gpus": num_gpus,
            "runtime_env": {"env_vars": env},
        },
    ).bind(config)
