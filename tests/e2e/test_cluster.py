"""ftaas on a two-node Ray cluster with no disk in common: S3 (moto's server, real S3 over
HTTP) holds every artifact, PostgreSQL the jobs.

The second node is a `ray start` in its own mount namespace, where the service's
FTAAS_HOME is hidden behind an empty tmpfs: whatever runs there can reach the service's
state only through S3, PostgreSQL and Ray. Each node offers one `trainer` resource and each
training worker asks for one, so the two workers train on the two nodes; the serving
replica asks for `remote`, which only the second node has.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from service.ray_cluster import free_port, free_ports
from tests.conftest import QUESTIONS, SECRET, memorisation_jsonl
from tests.e2e.conftest import (
    RunningServer,
    create_memorisation_job,
    greedy,
    wait_for_job,
    wait_for_serving,
)
from tests.postgres import PostgresServer
from tests.s3 import S3Server, environment

pytestmark = pytest.mark.e2e

WEIGHTS = (".safetensors", ".pt", ".bin", ".jsonl")


@dataclass
class Cluster:
    server: RunningServer
    s3: S3Server
    bucket: str
    node_cache: Path  # the second node's own disk


def _second_node(server: RunningServer, s3: S3Server, node_cache: Path, log: Path):
    address = json.loads((server.home / "ray.json").read_text())["address"]
    token = server.token_path.read_text().strip()  # read now: hidden from the node below
    temp_dir = tempfile.mkdtemp(prefix="ftaas-n2-", dir="/tmp")  # short: Ray's socket paths
    options = (
        "node-manager-port",
        "object-manager-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "metrics-export-port",
        "runtime-env-agent-port",
    )
    ports = [f"--{o}={p}" for o, p in zip(options, free_ports(len(options)), strict=True)]
    ray = str(Path(sys.executable).with_name("ray"))
    start = [
        ray, "start", f"--address={address}", "--num-cpus=4", "--block",
        f"--temp-dir={temp_dir}", '--resources={"trainer": 1, "remote": 1}',
        "--disable-usage-stats", *ports,
    ]  # fmt: skip
    home = shlex.quote(str(server.home))
    script = f"mount -t tmpfs ftaas-hidden {home} && exec {shlex.join(start)}"
    env = {
        **server.env,
        **s3.env,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "FTAAS_NODE_CACHE_DIR": str(node_cache),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
    }
    with open(log, "wb") as out:
        process = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return process, temp_dir


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server, postgres: PostgresServer
) -> Iterator[Cluster]:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("the second node needs `unshare --mount` (util-linux) as root")
    bucket = s3_server.new_bucket()
    server = RunningServer(
        tmp_path_factory.mktemp("cluster-home"),
        free_port(),
        tmp_path_factory.mktemp("cluster-user-home"),
    )
    server.env.update(
        {
            **s3_server.env,
            "FTAAS_STORAGE_URL": f"s3://{bucket}/ftaas",
            "FTAAS_DATABASE_URL": postgres.new_database(),
            "FTAAS_RAY_HEAD_RESOURCES": '{"trainer": 1}',
            "FTAAS_TRAINING_NUM_WORKERS": "2",
            "FTAAS_TRAINING_WORKER_RESOURCES": '{"trainer": 1}',
            "FTAAS_SERVING_RESOURCES": '{"remote": 1}',
        }
    )
    node_cache = Path(tempfile.mkdtemp(prefix="ftaas-node2-cache-"))
    node = temp_dir = None
    try:
        server.start()
        node, temp_dir = _second_node(server, s3_server, node_cache, server.home / "node2.log")
        yield Cluster(server, s3_server, bucket, node_cache)
    finally:
        if node is not None:
            os.killpg(node.pid, signal.SIGTERM)
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
        server.shutdown()
        for folder in (node_cache, temp_dir):
            if folder:
                shutil.rmtree(folder, ignore_errors=True)


def _stored(cluster: Cluster) -> dict[str, int]:
    with environment(cluster.s3.env):
        import boto3

        pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=cluster.bucket)
        return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


def test_train_pause_resume_and_chat_across_two_nodes_with_no_shared_disk(cluster: Cluster):
    client = cluster.server.client()
    started = time.monotonic()
    upload = client.files.create(file=("train.jsonl", memorisation_jsonl()), purpose="fine-tune")
    assert client.files.content(upload.id).content == memorisation_jsonl()  # back from S3
    job = create_memorisation_job(client, upload.id)
    deadline = time.monotonic() + 400
    while not any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job.id).data):
        assert time.monotonic() < deadline, client.fine_tuning.jobs.retrieve(job.id)
        time.sleep(0.5)
    assert client.fine_tuning.jobs.pause(job.id).status == "paused"
    deadline = time.monotonic() + 120
    while not any(
        "Checkpoint saved" in e.message for e in client.fine_tuning.jobs.list_events(job.id).data
    ):
        assert time.monotonic() < deadline, "the trainer never saved its pause checkpoint"
        time.sleep(0.5)
    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    finished = wait_for_job(client, job.id, timeout=900)
    assert finished.status == "succeeded", finished.error
    seconds = time.monotonic() - started

    wait_for_serving(client, "ftaas-tiny", timeout=600)
    word = SECRET.split()[-1].rstrip(".")
    assert word in greedy(client, finished.fine_tuned_model or "", QUESTIONS[0], max_tokens=24)
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert len(checkpoints) == 3  # the newest first: the last epoch's
    assert word in greedy(client, checkpoints[0].fine_tuned_model_checkpoint, QUESTIONS[0], 24)

    # Every artifact went through S3 ...
    stored = _stored(cluster)
    keys = "\n".join(stored)
    assert f"ftaas/files/{upload.id}" in stored
    assert f"ftaas/jobs/{job.id}/attempt-2/adapter/adapter_model.safetensors" in keys
    assert f"ftaas/jobs/{job.id}/attempt-1/paused/" in keys
    # ... the second node trained (it fetched the base model) and served (the adapter) ...
    fetched = [p.relative_to(cluster.node_cache).parts[0] for p in cluster.node_cache.rglob("*")]
    assert {"models", "adapters"} <= set(fetched)
    # ... and the service's own disk holds no training data and no weights.
    home = cluster.server.home
    held = [
        str(p.relative_to(home))
        for p in home.rglob("*")
        if p.is_file() and (p.name.endswith(WEIGHTS) or _holds(p, SECRET.encode()))
    ]
    assert held == []
    home_bytes = sum(p.stat().st_size for p in home.rglob("*") if p.is_file())
    print(
        f"\ncluster: succeeded in {seconds:.0f} s (pause and resume included); "
        f"S3 holds {len(stored)} objects, {sum(stored.values())} bytes; "
        f"FTAAS_HOME holds {home_bytes} bytes (logs, Ray's session, caches)"
    )


def _holds(path: Path, text: bytes) -> bool:
    try:
        with open(path, "rb") as stream:
            return text in stream.read(64 * 1024 * 1024)
    except OSError:
        return False
