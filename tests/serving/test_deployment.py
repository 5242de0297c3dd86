"""A replica's adapter bookkeeping above the engine (serving/deployment.py): adapters come
from a real S3 (moto's server) into a real node disk cache and register through Serve's
own multiplexer (its lock included); only vLLM's engine is a stand-in, and no Ray starts.

Review L13: Serve registers one adapter at a time per replica, so a cold adapter is fetched
onto the disk before it asks, and a slow fetch delays no other adapter."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
from ray.serve import multiplex

from serving.adapter_cache import KEY_FILE, AdapterCache
from serving.deployment import LLMServer
from serving.engine import EngineConfig, openai_error
from tests.serving.test_adapter_cache import _adapter
from training.storage import open_store

WAIT_S = 10.0  # far longer than anything here takes unless it waits behind another


class FakeEngine:
    """What the replica asks of vLLM: adapters registered by name, each loaded from its
    folder (which must be there, as vLLM reads it). A name in `held` waits for its event
    before it loads, so its registration holds Serve's lock meanwhile."""

    def __init__(self) -> None:
        self.registered: dict[str, str] = {}
        self.held: dict[str, asyncio.Event] = {}
        self.loading: list[str] = []

    def loaded_adapters(self) -> list[str]:
        return sorted(self.registered)

    async def load_adapter(self, name: str, path: str) -> tuple[int, dict[str, Any]] | None:
        self.loading.append(name)
        if name in self.held:
            await self.held[name].wait()
        if not (Path(path) / "adapter_model.safetensors").exists():
            return 500, openai_error(500, f"no adapter at {path}")
        self.registered[name] = path
        return None

    async def unload_adapter(self, name: str) -> bool:
        return self.registered.pop(name, None) is not None

    async def abort_adapter_requests(self, name: str) -> int:
        return 0

    def shutdown(self) -> None:
        pass


class Gate:
    """Holds every read of the store under `prefix` until opened: a slow fetch."""

    def __init__(self, store: Any, prefix: str):
        self.entered, self.opened = threading.Event(), threading.Event()
        self.reads: list[str] = []
        read = store.open

        def held_open(key: str) -> Any:
            if key.startswith(prefix):
                self.reads.append(key)
                self.entered.set()
                assert self.opened.wait(60)
            return read(key)

        store.open = held_open


@contextlib.contextmanager
def serve_multiplexing() -> Iterator[None]:
    """Serve's multiplexer outside a Serve replica: its replica context given, its metrics
    (which would start Ray) left out."""
    context = SimpleNamespace(app_name="ftaas-test", deployment="LLMServer", replica_id="r1")
    with (
        mock.patch.object(multiplex, "_get_internal_replica_context", return_value=context),
        mock.patch.object(multiplex, "metrics"),
        mock.patch.object(multiplex, "MetricsPusher"),
        mock.patch.object(multiplex, "ServeUsageTag"),
    ):
        yield


@pytest.fixture
def s3_store(s3_env, tmp_path):  # type: ignore[no-untyped-def]
    store = open_store(f"s3://{s3_env.new_bucket()}/ftaas")
    for name in ("a", "b", "c", "d"):
        _adapter(store, tmp_path, f"jobs/{name}/adapter", 1000)
    return store


@pytest.fixture
def replicas(tmp_path):  # type: ignore[no-untyped-def]
    made: list[Any] = []

    def replica(store: Any, max_bytes: int = 100_000) -> Any:
        cls = LLMServer.func_or_class
        server = cls.__new__(cls)
        config = EngineConfig(
            "base", "/models/base", 64, 8, 2, adapter_cache_bytes=max_bytes,
            max_adapters_per_replica=4,
        )  # fmt: skip
        disk = AdapterCache(store, max_bytes, "r1", root=tmp_path / "cache")
        server._serve(config, FakeEngine(), disk, "r1")
        made.append(server)
        return server

    yield replica
    for server in made:
        server._downloads.shutdown(wait=False, cancel_futures=True)


def run(scenario: Any, *gates: Gate) -> Any:
    async def opening_the_gates() -> Any:
        try:
            return await scenario()
        finally:  # a test failing: its held fetches end too
            for gate in gates:
                gate.opened.set()

    with serve_multiplexing():
        return asyncio.run(opening_the_gates())


def copies(tmp_path: Path) -> list[str]:
    return sorted(p.read_text() for p in (tmp_path / "cache").rglob(KEY_FILE))


def test_a_slow_cold_adapter_delays_no_other_adapters_registration(s3_store, replicas):
    gate = Gate(s3_store, "jobs/a/")
    server = replicas(s3_store)

    async def scenario() -> None:
        slow = [asyncio.create_task(server.load_adapter("ft:a", "jobs/a/adapter")) for _ in "12"]
        assert await asyncio.to_thread(gate.entered.wait, WAIT_S)
        # Cold too, it registers while a's fetch is still held up.
        assert await asyncio.wait_for(server.load_adapter("ft:b", "jobs/b/adapter"), WAIT_S) is None
        assert server.engine.loaded_adapters() == ["ft:b"]
        assert not any(task.done() for task in slow)
        gate.opened.set()
        assert await asyncio.wait_for(asyncio.gather(*slow), WAIT_S) == [None, None]

    run(scenario, gate)
    assert server.engine.loaded_adapters() == ["ft:a", "ft:b"]
    # One download of a for both of its requests, one registration per adapter.
    assert gate.reads.count("jobs/a/adapter/adapter_model.safetensors") == 1
    assert server.engine.loading == ["ft:b", "ft:a"]
    events = server.events
    assert (events["store_fetches"], events["disk_hits"], events["registry_loads"]) == (2, 0, 2)
    assert not server.in_use and not server._fetches and not server._from_store


def test_an_adapter_deleted_while_it_is_fetched_is_never_registered(s3_store, replicas, tmp_path):
    gate = Gate(s3_store, "jobs/a/")
    server = replicas(s3_store)

    async def scenario() -> tuple[int, dict[str, Any]]:
        load = asyncio.create_task(server.load_adapter("ft:a", "jobs/a/adapter"))
        assert await asyncio.to_thread(gate.entered.wait, WAIT_S)
        retire = asyncio.create_task(server.retire("ft:a"))
        await asyncio.sleep(0.2)
        # The fetch counts as a use: not confirmed retired, so its files stay meanwhile.
        assert not retire.done()
        gate.opened.set()
        error = await asyncio.wait_for(load, WAIT_S)
        await asyncio.wait_for(retire, WAIT_S)
        return error

    status, body = run(scenario, gate)
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert server.engine.loading == [] and copies(tmp_path) == []  # and its copy deleted
    assert not server.in_use and not server.adapter_keys and not server._from_store


async def fetched_and_waiting(server: Any, tmp_path: Path, names: str) -> list[asyncio.Task]:
    """Loads of `names`: the first one's registration holds Serve's lock (its engine load
    held), and then the others' copies are on the disk, waiting for that lock."""

    def load(name: str) -> asyncio.Task:
        return asyncio.create_task(server.load_adapter(f"ft:{name}", f"jobs/{name}/adapter"))

    loads = [load(names[0])]
    async with asyncio.timeout(WAIT_S):
        while server.engine.loading != [f"ft:{names[0]}"]:
            await asyncio.sleep(0.01)
        loads += [load(name) for name in names[1:]]
        while len(copies(tmp_path)) < len(names):
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # from their downloads to the lock
    return loads


def test_adapters_waiting_to_register_are_never_evicted_to_make_room(s3_store, replicas, tmp_path):
    """Making room for c spares d, fetched and waiting for its registration (a use)."""
    server = replicas(s3_store, max_bytes=1500)  # room for one adapter
    server.engine.held["ft:b"] = release_b = asyncio.Event()

    async def scenario() -> list[Any]:
        loads = await fetched_and_waiting(server, tmp_path, "bcd")
        release_b.set()
        return await asyncio.wait_for(asyncio.gather(*loads), WAIT_S)

    assert run(scenario) == [None, None, None]
    assert server.engine.loaded_adapters() == ["ft:b", "ft:c", "ft:d"]
    # Over the budget, but every copy registered (vLLM may read it again): none deleted.
    assert server.events["disk_evictions"] == 0 and server.events["store_fetches"] == 3
    assert copies(tmp_path) == ["jobs/b/adapter", "jobs/c/adapter", "jobs/d/adapter"]


def test_an_adapter_deleted_while_it_waits_to_register_is_never_registered(
    s3_store, replicas, tmp_path
):
    server = replicas(s3_store)
    server.engine.held["ft:b"] = release_b = asyncio.Event()

    async def scenario() -> list[Any]:
        loads = await fetched_and_waiting(server, tmp_path, "bc")
        retire = asyncio.create_task(server.retire("ft:c"))
        await asyncio.sleep(0.1)
        release_b.set()
        return [*await asyncio.wait_for(asyncio.gather(*loads), WAIT_S), await retire]

    b, (status, body), _ = run(scenario)
    assert b is None and status == 404 and body["error"]["code"] == "model_not_found"
    assert server.engine.loading == ["ft:b"] and server.engine.loaded_adapters() == ["ft:b"]
    assert copies(tmp_path) == ["jobs/b/adapter"]  # c's copy deleted with it
    assert not server.in_use and sorted(server.adapter_keys) == ["ft:b"]
