"""deploy/kuberay/ftaas.yaml's RayService, run here as KubeRay would run it: a Ray head
started from its head group (custom resources, token authentication), the container's
environment built from its ConfigMap and Secret references, and its serveConfigV2 sent
to the dashboard's REST API as KubeRay sends it. The API then answers through Serve's
proxy, and a job trains and chats, with S3 (moto) and PostgreSQL as on the cluster.

What only a Kubernetes cluster can show (the operator, pods, GPUs, the autoscaler) is
beyond this test; the manifests' schemas are checked in tests/deploy.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from service.ray_cluster import RayCluster, free_ports, head_ports, stop_head
from tests.conftest import QUESTIONS, SECRET, memorisation_jsonl
from tests.deploy.manifests import ray_service, resource, serve_config
from tests.e2e.conftest import (
    RunningServer,
    create_memorisation_job,
    greedy,
    wait_for_job,
    wait_for_serving,
)
from tests.postgres import PostgresServer
from tests.s3 import S3Server

pytestmark = pytest.mark.e2e

API_KEY = "rayservice-test-key"


@dataclass
class Deployed:
    cluster: RayCluster
    token: str
    api_url: str

    def client(self) -> OpenAI:
        return OpenAI(base_url=f"{self.api_url}/v1", api_key=API_KEY, max_retries=0)


def _head_environment(home: Path, s3: S3Server, bucket: str, database_url: str) -> dict[str, str]:
    """The head container's environment as Kubernetes would give it, from the manifest's
    own references; only what must differ on this machine is replaced."""
    container = ray_service()["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"][
        "containers"
    ][0]
    secret_values = {
        ("ftaas-postgres", "url"): database_url,
        ("ftaas-api-keys", "keys"): f"{API_KEY}:org-rayservice",
        ("ftaas-api-keys", "admin_keys"): f"admin-{API_KEY}:org-rayservice",
        ("ftaas-api-keys", "metrics_key"): f"metrics-{API_KEY}",
    }
    local_paths = {"FTAAS_HOME": home / "ftaas", "FTAAS_NODE_CACHE_DIR": home / "node-cache"}
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in RunningServer.NOT_ON_A_FRESH_MACHINE
    }
    env["HOME"] = str(home / "user")
    for source in container["envFrom"]:
        if "configMapRef" in source:
            env.update(resource("ConfigMap", source["configMapRef"]["name"])["data"])
        else:
            assert source["secretRef"]["name"] == "ftaas-s3"
            env.update(s3.env)
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = str(local_paths.get(item["name"], item["value"]))
        elif "fieldRef" in item["valueFrom"]:  # the label KubeRay gives its cluster's pods
            assert item["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['ray.io/cluster']"
            env[item["name"]] = "ftaas-raycluster-local"
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secret_values[(ref["name"], ref["key"])]
    env.update(
        {
            "FTAAS_STORAGE_URL": f"s3://{bucket}/ftaas",
            "FTAAS_USE_GPU": "false",  # no GPU here; the manifest's GPU group has them
            "RAY_AUTH_MODE": "token",  # what KubeRay's authOptions give the Ray container
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
        }
    )
    env.pop("FTAAS_BASE_MODELS_FILE")  # the embedded ftaas-tiny instead of a real model
    env["FTAAS_EMBEDDED_MODELS"] = "ftaas-tiny"
    for path in (*local_paths.values(), home / "user"):
        path.mkdir(parents=True, exist_ok=True)
    return env


def _start_head(env: dict[str, str], temp_dir: str) -> RayCluster:
    head = ray_service()["spec"]["rayClusterConfig"]["headGroupSpec"]
    resources = {name: float(value) for name, value in head["resources"].items()}
    (gcs, dashboard), port_options = head_ports(2)
    command = [
        str(Path(sys.executable).with_name("ray")), "start", "--head",
        f"--port={gcs}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
        "--num-cpus=6", f"--resources={json.dumps(resources)}", f"--temp-dir={temp_dir}",
        "--disable-usage-stats", *port_options,
    ]  # fmt: skip
    subprocess.run(command, env=env, check=True, capture_output=True)
    return RayCluster(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", temp_dir)


def _dashboard(cluster: RayCluster, token: str, path: str, body: Any = None) -> Any:
    request = urllib.request.Request(
        f"{cluster.dashboard_url}{path}",
        data=None if body is None else json.dumps(body).encode(),
        method="GET" if body is None else "PUT",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.loads(reply.read() or b"null")


def _wait_for_api(deployed: Deployed, timeout: float = 420) -> None:
    deadline = time.monotonic() + timeout
    while True:
        apps = _dashboard(deployed.cluster, deployed.token, "/api/serve/applications/")
        api = apps["applications"].get("ftaas-api", {})
        assert api.get("status") != "DEPLOY_FAILED", api.get("message")
        if api.get("status") == "RUNNING":
            with urllib.request.urlopen(f"{deployed.api_url}/health", timeout=10):
                return
        assert time.monotonic() < deadline, f"ftaas-api not running: {api}"
        time.sleep(2)


@pytest.fixture(scope="module")
def deployed(
    tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server, postgres: PostgresServer
) -> Iterator[Deployed]:
    home = tmp_path_factory.mktemp("rayservice")
    env = _head_environment(home, s3_server, s3_server.new_bucket(), postgres.new_database())
    temp_dir = tempfile.mkdtemp(prefix="ftaas-rs-", dir="/tmp")  # short: Ray's socket paths
    cluster = _start_head(env, temp_dir)
    try:
        config = serve_config()
        serve_port = free_ports(1)[0]
        config["http_options"] = {**config["http_options"], "host": "127.0.0.1", "port": serve_port}
        deployed = Deployed(cluster, env["RAY_AUTH_TOKEN"], f"http://127.0.0.1:{serve_port}")
        _dashboard(cluster, deployed.token, "/api/serve/applications/", config)  # as KubeRay
        _wait_for_api(deployed)
        yield deployed
    finally:
        stop_head(cluster)
        subprocess.run(["rm", "-rf", temp_dir], check=False)


def test_the_rayservice_serve_config_runs_the_api_which_trains_and_chats(deployed: Deployed):
    client = deployed.client()
    upload = client.files.create(file=("train.jsonl", memorisation_jsonl()), purpose="fine-tune")
    assert client.files.content(upload.id).content == memorisation_jsonl()
    job = create_memorisation_job(client, upload.id)
    finished = wait_for_job(client, job.id, timeout=900)
    assert finished.status == "succeeded", finished.error

    wait_for_serving(client, "ftaas-tiny", timeout=600)
    word = SECRET.split()[-1].rstrip(".")
    assert word in greedy(client, finished.fine_tuned_model or "", QUESTIONS[0], max_tokens=24)
    # Streaming crosses Serve's proxy as server-sent events, chunk by chunk.
    stream = client.chat.completions.create(
        model=finished.fine_tuned_model or "",
        messages=[{"role": "user", "content": QUESTIONS[0]}],
        temperature=0,
        max_tokens=24,
        stream=True,
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(pieces) > 1 and word in "".join(pieces)


def test_the_api_refuses_requests_without_a_key(deployed: Deployed):
    request = urllib.request.Request(f"{deployed.api_url}/v1/models")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401
