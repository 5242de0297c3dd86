"""The artifact store, the same contract on a local folder and on S3 (moto's server, real
S3 over HTTP): what is written is read back whole, a refused or half-done write leaves
nothing a reader could take for finished, and no key leaves the store."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

from training.node_cache import fetch_model
from training.progress import Metrics, ProgressLog, Started
from training.storage import (
    MULTIPART_CHUNK_BYTES,
    ArtifactStore,
    BlobTooLarge,
    IncompleteFolder,
    LocalStore,
    S3Store,
    open_store,
)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    server = request.getfixturevalue("s3_env")
    return open_store(f"s3://{server.new_bucket()}/some/prefix")


def test_objects_are_written_listed_read_and_deleted(store: ArtifactStore):
    assert store.put_bytes("files/a", b"alpha") == 5
    store.put_bytes("files/b/c", b"gamma")
    assert store.get_bytes("files/a") == b"alpha" and store.exists("files/b/c")
    assert [(o.key, o.size) for o in store.list("files")] == [("files/a", 5), ("files/b/c", 5)]
    assert [o.key for o in store.list("files", after="files/a")] == ["files/b/c"]
    assert list(store.list("nothing")) == []
    store.delete("files/b")
    assert [o.key for o in store.list("files")] == ["files/a"]
    with pytest.raises(FileNotFoundError):
        store.open("files/missing")


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs", "a//b", "a/../../b", "", "a b", "é"])
def test_no_key_leaves_the_store(store: ArtifactStore, key: str):
    with pytest.raises(ValueError):
        store.put_bytes(key, b"x")


def test_a_large_upload_streams_in_parts_and_reads_back_whole(store: ArtifactStore):
    size = 2 * MULTIPART_CHUNK_BYTES + 12345  # three parts on S3
    data = os.urandom(size)
    assert store.put_file("files/big", io.BytesIO(data), max_bytes=size) == size
    with store.open("files/big") as stream:
        digest = hashlib.md5(usedforsecurity=False)
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    assert digest.hexdigest() == hashlib.md5(data, usedforsecurity=False).hexdigest()


def test_a_stream_past_its_limit_leaves_nothing(store: ArtifactStore):
    data = os.urandom(MULTIPART_CHUNK_BYTES + 10)  # past one part: a multipart upload on S3
    with pytest.raises(BlobTooLarge):
        store.put_file("files/too-big", io.BytesIO(data), max_bytes=MULTIPART_CHUNK_BYTES)
    assert not store.exists("files/too-big") and list(store.list("files")) == []
    if isinstance(store, S3Store):  # the multipart upload was aborted, not left to bill
        pending = store.client.list_multipart_uploads(Bucket=store.bucket)
        assert not pending.get("Uploads")


def test_parts_concatenate_in_order_with_their_md5(store: ArtifactStore):
    store.put_bytes("uploads/u/2", b"world")
    store.put_bytes("uploads/u/1", b"hello ")
    size, md5 = store.put_concatenation("files/joined", ["uploads/u/1", "uploads/u/2"])
    assert store.get_bytes("files/joined") == b"hello world" and size == 11
    assert md5 == hashlib.md5(b"hello world", usedforsecurity=False).hexdigest()


def test_a_folder_is_whole_only_once_its_manifest_is_written(store, tmp_path):
    local = tmp_path / "adapter"
    (local / "nested").mkdir(parents=True)
    (local / "adapter_config.json").write_text("{}")
    (local / "nested" / "weights.bin").write_bytes(b"w" * 1000)
    store.put_bytes("jobs/j/adapter/adapter_config.json", b"{}")  # a half-written upload
    assert not store.folder_complete("jobs/j/adapter")
    with pytest.raises(IncompleteFolder):
        store.get_folder("jobs/j/adapter", tmp_path / "copy")

    store.put_folder(local, "jobs/j/adapter")
    assert store.folder_complete("jobs/j/adapter") and store.folder_complete(
        "jobs/j/adapter/nested"
    )
    copy = store.get_folder("jobs/j/adapter", tmp_path / "copy")
    assert (copy / "nested" / "weights.bin").read_bytes() == b"w" * 1000
    assert store.folder_bytes("jobs/j/adapter") == 1002

    store.put_bytes("jobs/j/adapter/nested/weights.bin", b"truncated")  # not what it lists
    with pytest.raises(IncompleteFolder, match="manifest says 1000"):
        store.get_folder("jobs/j/adapter", tmp_path / "copy")
    assert (tmp_path / "copy" / "nested" / "weights.bin").stat().st_size == 1000  # untouched


def test_progress_records_are_read_in_order_from_where_the_reader_stopped(store):
    trainer = ProgressLog(store, "jobs/j/attempt-1")
    trainer.write(Started(total_steps=3, n_examples=2, trained_tokens=10))
    trainer.write(Metrics(step=1, total_steps=3, train_loss=1.0))
    first = ProgressLog(store, "jobs/j/attempt-1").read_from(0)
    assert [r.type for r in first.records] == ["started", "metrics"] and first.offset == 2
    restarted = ProgressLog(store, "jobs/j/attempt-1")  # a new rank 0 continues the numbering
    restarted.write(Metrics(step=2, total_steps=3, train_loss=0.5))
    later = ProgressLog(store, "jobs/j/attempt-1").read_from(first.offset)
    assert [r.step for r in later.records] == [2] and later.offset == 3  # type: ignore[union-attr]
    assert ProgressLog(store, "jobs/j/attempt-1").read_from(3).records == []


def test_a_base_model_under_an_s3_prefix_is_fetched_once_per_node(s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv("FTAAS_NODE_CACHE_DIR", str(tmp_path / "node"))
    bucket = s3_env.new_bucket()
    store = open_store(f"s3://{bucket}")
    store.put_bytes("models/m/config.json", b"{}")  # as `aws s3 sync` leaves it: no manifest
    store.put_bytes("models/m/tokenizer/vocab.json", b"[]")
    local = Path(fetch_model(f"s3://{bucket}/models/m"))
    assert (local / "config.json").read_bytes() == b"{}"
    assert (local / "tokenizer" / "vocab.json").read_bytes() == b"[]"
    assert local.is_relative_to(tmp_path / "node")
    store.delete("models/m")
    assert fetch_model(f"s3://{bucket}/models/m") == str(local)  # cached: S3 not asked again
    assert fetch_model("/a/local/path") == "/a/local/path"
    assert fetch_model("org/hub-id") == "org/hub-id"
