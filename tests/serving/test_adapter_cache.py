"""Adapters reach a serving node through the artifact store: fetched whole and checked,
kept within the node's disk budget (least recently used out first), and served in place
from a local store."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from serving.adapter_cache import AdapterCache
from training.node_cache import locked
from training.storage import IncompleteFolder, LocalStore, open_store


def _adapter(store, tmp_path: Path, key: str, size: int) -> None:
    local = tmp_path / "src" / key.replace("/", "_")
    local.mkdir(parents=True)
    (local / "adapter_config.json").write_text("{}")
    (local / "adapter_model.safetensors").write_bytes(os.urandom(size))
    store.put_folder(local, key)


def test_adapters_are_fetched_checked_and_the_least_recent_evicted(s3_env, tmp_path):
    store = open_store(f"s3://{s3_env.new_bucket()}/ftaas")
    for name in ("a", "b", "c"):
        _adapter(store, tmp_path, f"jobs/{name}/adapter", 1000)
    cache = AdapterCache(store, max_bytes=2100, owner="r1", root=tmp_path / "cache")
    first = cache.fetch("jobs/a/adapter")
    a = first.path
    assert (a / "adapter_model.safetensors").stat().st_size == 1000
    assert first.from_store and first.evicted == []
    cache.fetch("jobs/b/adapter")
    time.sleep(0.01)
    again = cache.fetch("jobs/a/adapter")  # used again: now the most recent
    assert again.path == a and not again.from_store and again.evicted == []
    third = cache.fetch("jobs/c/adapter")
    assert third.evicted == ["jobs/b/adapter"] and a.exists()

    store.put_bytes("jobs/d/adapter/adapter_config.json", b"{}")  # still being written
    with pytest.raises(IncompleteFolder):
        cache.fetch("jobs/d/adapter")


def test_adapters_the_engine_registered_are_never_evicted_and_deleted_ones_go(s3_env, tmp_path):
    store = open_store(f"s3://{s3_env.new_bucket()}/ftaas")
    for name in ("a", "b", "c"):
        _adapter(store, tmp_path, f"jobs/{name}/adapter", 1000)
    cache = AdapterCache(store, max_bytes=1500, owner="r1", root=tmp_path / "cache")
    a = cache.fetch("jobs/a/adapter").path
    time.sleep(0.01)
    b = cache.fetch("jobs/b/adapter", pinned=["jobs/a/adapter"])
    assert b.evicted == [] and a.exists()  # over budget, but a is pinned
    c = cache.fetch("jobs/c/adapter", pinned=["jobs/b/adapter"])
    assert c.evicted == ["jobs/a/adapter"] and not a.exists()
    cache.forget("jobs/c/adapter")
    assert not c.path.exists()
    assert cache.fetch("jobs/c/adapter").from_store  # fetched again after it was forgotten


def test_a_local_store_serves_adapters_in_place(tmp_path):
    store = LocalStore(tmp_path / "store")
    _adapter(store, tmp_path, "jobs/a/adapter", 10)
    fetched = AdapterCache(store, max_bytes=0, owner="r1", root=tmp_path / "cache").fetch(
        "jobs/a/adapter"
    )
    assert fetched.path == tmp_path / "store" / "jobs" / "a" / "adapter"


def test_replicas_on_one_node_never_evict_each_others_adapters(s3_env, tmp_path):
    """Two replicas share the node's disk: each one's budget counts its own copies, so
    one making room never deletes a folder the other's engine may load again."""
    store = open_store(f"s3://{s3_env.new_bucket()}/ftaas")
    for name in ("a", "b", "c"):
        _adapter(store, tmp_path, f"jobs/{name}/adapter", 1000)
    node = tmp_path / "cache"
    first = AdapterCache(store, max_bytes=1500, owner="r1", root=node)
    second = AdapterCache(store, max_bytes=1500, owner="r2", root=node)
    held = first.fetch("jobs/a/adapter").path
    assert second.fetch("jobs/b/adapter").evicted == []
    assert second.fetch("jobs/c/adapter").evicted == ["jobs/b/adapter"]
    assert held.exists()  # the first replica's copy, untouched
    # A replica gone (its process ended, here its lock given up): the next start clears it.
    first.close()
    AdapterCache(store, max_bytes=1500, owner="r3", root=node)
    assert not held.exists() and second.fetch("jobs/c/adapter").path.exists()


def test_downloads_make_no_room_and_room_is_made_around_copies_downloading(s3_env, tmp_path):
    """Several adapters download at once (review L13), each under its own lock: room is made
    apart (one registration at a time), and never by deleting, or waiting for, a copy
    whose lock a download holds."""
    store = open_store(f"s3://{s3_env.new_bucket()}/ftaas")
    for name in ("a", "b", "c"):
        _adapter(store, tmp_path, f"jobs/{name}/adapter", 1000)
    cache = AdapterCache(store, max_bytes=1500, owner="r1", root=tmp_path / "cache")
    a = cache.download("jobs/a/adapter")
    time.sleep(0.01)
    b = cache.download("jobs/b/adapter")
    assert a.from_store and b.from_store and a.evicted == b.evicted == []
    assert a.path.exists() and b.path.exists()  # over the budget until room is made
    time.sleep(0.01)
    with locked(a.path):  # as a download of a holds it
        c = cache.fetch("jobs/c/adapter")
    assert c.evicted == ["jobs/b/adapter"] and a.path.exists()  # the least recent, a, kept
    assert cache.fetch("jobs/c/adapter").evicted == ["jobs/a/adapter"]
