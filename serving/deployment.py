"""The Ray Serve deployment: one application per base model, `num_replicas` replicas (or
Serve's autoscaler between bounds), each a vLLM engine with LoRA.

The service reaches it through a deployment handle (no HTTP hop): `respond` streams a head
then SSE strings, and `load_adapter` / `retire` change what is served without a
restart. Adapters are named by their key in the artifact store.

Routing is adapter-affine through Serve's model multiplexing: every call for a tuned model
carries the adapter's name as its multiplexed model id, each replica registers the adapters
it serves through a `serve.multiplexed` loader, and Serve's router sends a call to a
replica that holds its adapter unless those replicas are full (`max_ongoing_requests`),
then to the least loaded. A call that finds every replica full waits in the caller's queue
(`max_queued_requests`); beyond that the caller gets BackPressureError (the API's 429).

An adapter moves through five tiers, each bounded per base model:
  accelerator slots (`max_loras`, vLLM) → host memory (`max_cpu_loras`, vLLM) → registered
  with the engine (`max_adapters_per_replica`, Serve's multiplexer, least recently used out)
  → the replica's disk (`adapter_cache_bytes`, least recently used out, registered ones
  pinned) → the artifact store.
The replica counts hits, loads and evictions of the two tiers it runs (serving/stats.py).

Serve's multiplexer registers one adapter at a time per replica (its loader runs under
one lock), so an adapter is fetched onto the node's disk before it asks (`_on_disk`, one
fetch per adapter however many requests wait for it, several adapters at once): a large
cold adapter delays only its own requests (review L13). Under that lock, registering is
a look at the disk copy, making room there, and vLLM's load.

A deleted model's adapter is retired on every replica before its files go ("serving
first, files last", `LLMServer.retire`): vLLM reloads an adapter it dropped from host
memory from the replica's disk in the middle of an engine step, and a folder missing there
is fatal to the engine, that is to every tenant's requests on the replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from serving import stats
from serving.adapter_cache import AdapterCache, Fetched
from serving.engine import (
    EngineConfig,
    OpenAIEngine,
    RequestKind,
    RequestMeter,
    openai_error,
    start_meter,
)
from training.node_cache import fetch_model
from training.storage import open_store

logger = logging.getLogger(__name__)

STATS_INTERVAL_S = 0.5
# A retired adapter's aborted requests end within a step or two; one stuck longer (still on
# its way to the engine) keeps its adapter registered until it ends.
RETIRE_WAIT_S = 10.0
# Adapters a replica fetches from the store at once (threads of their own: a registration's
# look at the disk never waits behind downloads).
ADAPTER_DOWNLOADS = 8


class RegisteredAdapter:
    """What Serve's multiplexer holds for one adapter: when it drops the least recently
    used, its `__del__` hands the name back to the replica to unregister from vLLM."""

    def __init__(self, name: str, evicted: list[str]):
        self.name, self._evicted, self._gone = name, evicted, False

    def __del__(self) -> None:
        if not self._gone:  # once: Serve calls it, later the garbage collector may
            self._gone = True
            self._evicted.append(self.name)


@serve.deployment(health_check_period_s=10, health_check_timeout_s=60)
class LLMServer:
    async def __init__(self, config: EngineConfig, fingerprint: str = ""):  # type: ignore[misc]  # Serve awaits it
        self.fingerprint = fingerprint  # of what it was deployed with (app_fingerprint)
        model_path = await asyncio.to_thread(fetch_model, config.model_path)
        config = dataclasses.replace(config, model_path=model_path)
        replica = serve.get_replica_context().replica_id.unique_id
        disk = await asyncio.to_thread(
            AdapterCache, open_store(config.storage_url), config.adapter_cache_bytes, replica
        )
        self._serve(config, await OpenAIEngine.start(config), disk, replica)
        self._poster = asyncio.create_task(self._post_stats())

    def _serve(
        self, config: EngineConfig, engine: OpenAIEngine, disk: AdapterCache, replica: str
    ) -> None:
        """The replica's adapter bookkeeping around its started engine."""
        self.config, self.engine, self.disk, self.replica = config, engine, disk, replica
        self.adapter_keys: dict[str, str] = {}  # adapter name → its key in the store
        self.in_use: Counter[str] = Counter()  # adapter name → requests using it now
        self.evicted: list[str] = []  # dropped by the multiplexer, to unregister
        self.retired: set[str] = set()  # deleted models' adapters: never served here again
        self.retired_through: tuple[str, int] | None = None  # the board's stamp applied
        self.events = stats.AdapterEvents()
        self._downloads = ThreadPoolExecutor(ADAPTER_DOWNLOADS, "adapter-download")
        self._fetches: dict[str, asyncio.Future[Fetched]] = {}  # key → its download now
        # Keys on the disk from the store, not yet counted by a registration.
        self._from_store: set[str] = set()

        async def register(name: str) -> RegisteredAdapter:
            return await self._register(name)

        # Serve keeps the set per replica, evicts the least recently used beyond the bound,
        # and tells its routers which replica holds which adapter.
        self.registry = serve.multiplexed(
            max_num_models_per_replica=config.max_adapters_per_replica
        )(register)

    async def _register(self, name: str) -> RegisteredAdapter:
        """Serve's multiplexer missed (under its lock: one registration at a time): register
        the adapter with the engine (which loads it into host memory) from this node's
        disk, where `_acquire` brought it, making room there."""
        if name in self.retired:  # deleted while it waited for the lock
            raise AdapterRetired(name)
        self.events.add("registry_loads")
        if name in self.evicted:  # dropped, and wanted again before it was unregistered
            self.evicted.remove(name)
        key = self.adapter_keys[name]
        # Never deleted to make room: what the engine registered (vLLM may reload it from
        # the disk at any time) and what requests are registering (fetched, or fetching).
        held = {*self.engine.loaded_adapters(), *self.in_use}
        pinned = [self.adapter_keys[n] for n in held if n in self.adapter_keys]
        fetched = await asyncio.to_thread(self.disk.fetch, key, pinned)
        from_store = fetched.from_store or key in self._from_store
        self._from_store.difference_update([key, *fetched.evicted])
        self.events.add("store_fetches" if from_store else "disk_hits")
        self.events.add("disk_evictions", len(fetched.evicted))
        error = await self.engine.load_adapter(name, str(fetched.path))
        if error is not None:
            raise AdapterLoadFailed(*error)
        return RegisteredAdapter(name, self.evicted)

    async def _on_disk(self, key: str) -> None:
        """Bring the adapter onto this node's disk, beside other adapters' downloads: one
        download per key, whichever of its requests started it going away meanwhile."""
        download = self._fetches.get(key)
        if download is None:
            loop = asyncio.get_running_loop()
            download = loop.run_in_executor(self._downloads, self.disk.download, key)
            self._fetches[key] = download
            download.add_done_callback(functools.partial(self._downloaded, key))
        await asyncio.shield(download)

    def _downloaded(self, key: str, download: asyncio.Future[Fetched]) -> None:
        if self._fetches.get(key) is download:
            del self._fetches[key]
        done = not download.cancelled() and download.exception() is None
        if done and download.result().from_store:
            self._from_store.add(key)

    async def _acquire(self, name: str, key: str) -> tuple[int, dict[str, Any]] | None:
        """Make `name` servable here and mark it in use; None, or an error reply."""
        if name in self.retired:
            return _deleted(name)
        self.adapter_keys[name] = key
        # In use from now, while it is fetched and registers: nothing unregisters, retires
        # or deletes it from the disk meanwhile.
        self.in_use[name] += 1
        self.events.add("registry_lookups")
        try:
            if name not in self.engine.loaded_adapters():
                await self._on_disk(key)  # outside the multiplexer's lock
            if name not in self.retired:
                await self.registry(name)
        except AdapterLoadFailed as failed:
            self._release(name)
            return failed.status, failed.body
        except Exception as fetch_error:
            self._release(name)
            if name in self.retired:  # deleted meanwhile: its files may be gone already
                return _deleted(name)
            message = f"The model's adapter could not be fetched: {fetch_error}"
            return 500, openai_error(500, message)
        except BaseException:  # cancelled: the caller went away
            self._release(name)
            raise
        if name in self.retired:  # deleted while it was fetched or registered
            self._release(name)
            return _deleted(name)
        await self._unregister_evicted()
        return None

    def _release(self, name: str) -> None:
        self.in_use[name] -= 1
        if self.in_use[name] <= 0:
            del self.in_use[name]

    async def _unregister_evicted(self) -> None:
        """Unregister what the multiplexer dropped, once no request still generates with it."""
        for name in [n for n in self.evicted if not self.in_use[n]]:
            if self.in_use[name] or name not in self.evicted:
                continue  # asked for again while another was being unregistered
            self.evicted.remove(name)
            self.adapter_keys.pop(name, None)  # a request naming it again gives it back
            if await self.engine.unload_adapter(name):
                self.events.add("registry_evictions")

    async def load_adapter(self, name: str, key: str) -> tuple[int, dict[str, Any]] | None:
        """Register an adapter ahead of its first request (the API calls it for a newly
        succeeded model, with the model's name as multiplexed id: the replica that gets
        it is the one its requests will be routed to)."""
        error = await self._acquire(name, key)
        if error is None:
            self._release(name)
        return error

    async def retire(self, name: str) -> None:
        """A deleted model's adapter, as an eviction: refused from now on, its requests
        aborted (each ends with a `model_not_found` error), and only once none uses it
        unregistered from vLLM and its copy on this node's disk deleted. (Serve's
        multiplexer keeps its entry until it is the least recently used.)"""
        self.retired.add(name)
        deadline = time.monotonic() + RETIRE_WAIT_S
        while self.in_use[name] and time.monotonic() < deadline:
            # Again each time: a request may reach the engine after the first abort.
            await self.engine.abort_adapter_requests(name)
            await asyncio.sleep(0.02)
        await self._drop_retired()

    async def _drop_retired(self) -> bool:
        """Unregister retired adapters no request uses and delete their copies; whether
        none is left in use (one still is: aborted again, dropped on a later call)."""
        done = True
        held = {*self.adapter_keys, *self.in_use, *self.engine.loaded_adapters()}
        for name in sorted(self.retired & held):
            if self.in_use[name]:
                await self.engine.abort_adapter_requests(name)
                done = False
                continue
            key = self.adapter_keys.pop(name, None)
            await self.engine.unload_adapter(name)
            if key is not None:
                self._from_store.discard(key)
                await asyncio.to_thread(self.disk.forget, key)
        return done

    async def _apply(self, retirements: stats.Retirements) -> None:
        """Retire what the board announced, and confirm it once nothing here uses it."""
        for name in retirements.names - self.retired:
            await self.retire(name)
        # The board forgets old retirements, and so does the replica, once they are done.
        self.retired = set(retirements.names) | {n for n in self.retired if self.in_use[n]}
        if await self._drop_retired():
            self.retired_through = retirements.stamp

    async def loaded_adapters(self) -> list[str]:
        return self.engine.loaded_adapters()

    async def respond(
        self, kind: RequestKind, body: dict[str, Any], adapter: tuple[str, str] | None
    ) -> AsyncIterator[Any]:
        """A head (`status`, `stream`, `body` unless streaming, `stats` once known), then
        for streams the SSE strings and a last `{"stats": ...}`. Cancelled by the caller
        (the client went away), vLLM aborts the generation."""
        if adapter is not None:
            error = await self._acquire(*adapter)
            if error is not None:
                status, error_body = error
                yield {"status": status, "body": error_body, "stream": False}
                return
        meter = start_meter()
        streaming = False
        try:
            async with contextlib.aclosing(self.engine.respond(kind, body)) as replies:
                async for item in replies:
                    if adapter is not None and adapter[0] in self.retired:
                        # Its generation was aborted: the answer ends with the reason.
                        status, error_body = _deleted(adapter[0])
                        if not streaming:
                            yield {"status": status, "body": error_body, "stream": False}
                            return
                        yield f"data: {json.dumps(error_body)}\n\n"
                        yield "data: [DONE]\n\n"
                        break
                    if isinstance(item, dict):  # the head
                        streaming = item["stream"]
                        if not streaming:
                            item["stats"] = self._request_stats(meter)
                    yield item
            if streaming:
                yield {"stats": self._request_stats(meter)}
        finally:
            if adapter is not None:
                self._release(adapter[0])

    def _request_stats(self, meter: RequestMeter) -> dict[str, Any]:
        return {**meter.summary(), "replica": self.replica}

    def snapshot(self) -> dict[str, Any]:
        return {
            "replica": self.replica,
            "base_model": self.config.model_id,
            "engine_requests": self.engine.unfinished_requests(),
            "engine_generated_tokens": self.engine.generated_tokens(),
            "adapters_registered": len(self.engine.loaded_adapters()),
            "retired_through": self.retired_through,
            "events": dict(self.events),
        }

    async def _post_stats(self) -> None:
        board = await asyncio.to_thread(stats.board)
        while True:
            try:
                await self._apply(await board.post.remote(self.replica, self.snapshot()))
            except Exception:  # the board restarting: post next time
                logger.debug("posting to the stats board failed", exc_info=True)
            await asyncio.sleep(STATS_INTERVAL_S)

    async def deployed_with(self) -> str:
        """The fingerprint of the configuration this replica was deployed with."""
        return self.fingerprint

    async def check_health(self) -> None:
        await self.engine.engine.check_health()

    def __del__(self) -> None:
        poster = getattr(self, "_poster", None)
        if poster is not None:
            poster.cancel()
        downloads = getattr(self, "_downloads", None)
        if downloads is not None:
            downloads.shutdown(wait=False, cancel_futures=True)
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def _deleted(name: str) -> tuple[int, dict[str, Any]]:
    body = openai_error(404, f"The model `{name}` has been deleted.", "model")
    body["error"]["code"] = "model_not_found"
    return 404, body


class AdapterRetired(Exception):
    """The adapter's model was deleted before it was registered: it is not registered."""


class AdapterLoadFailed(Exception):
    def __init__(self, status: int, body: dict[str, Any]):
        super().__init__(body["error"]["message"])
        self.status, self.body = status, body


def app_fingerprint(config: EngineConfig, options: dict[str, Any]) -> str:
    """What an application was deployed with (the engine's configuration and the
    replicas' options), in 16 hex digits: a running application with another one is
    deployed again, not reused."""
    described = {"config": dataclasses.asdict(config), "options": options}
    text = json.dumps(described, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_llm_app(
    config: EngineConfig,
    *,
    num_cpus: float,
    num_gpus: float,
    env: dict[str, str],
    replicas: dict[str, Any],
    max_ongoing_requests: int,
    max_queued_requests: int,
    resources: dict[str, float] | None = None,
    fingerprint: str = "",
) -> Any:
    """`replicas`: {"num_replicas": n} or {"autoscaling_config": {...}}."""
    return LLMServer.options(  # type: ignore[attr-defined]
        **replicas,
        max_ongoing_requests=max_ongoing_requests,
        max_queued_requests=max_queued_requests,
        ray_actor_options={
            "num_cpus": num_cpus,
            "num_gpus": num_gpus,
            "resources": resources or {},
            "runtime_env": {"env_vars": env},
        },
    ).bind(config, fingerprint)
