"""Which Ray cluster the service uses: `RAY_ADDRESS`, or an embedded head it starts.

The embedded head runs as its own processes (`ray start --head`), not inside the API
process, so training jobs and serving replicas outlive a restart of the API; its address
is kept under FTAAS_HOME and reused by the next start. `stop_embedded_head` ends it
(and only it: `ray stop` would end every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

from service.config import Settings

logger = logging.getLogger(__name__)


# Ray's token authentication, on for the embedded head and every driver that joins it
# (Ray only switches it on by itself for some ways of connecting).
RAY_ENV = {"RAY_AUTH_MODE": "token"}


@dataclass(frozen=True)
class RayCluster:
    address: str
    dashboard_url: str


def use_gpu(settings: Settings) -> bool:
    """FTAAS_USE_GPU if set, else whether the connected cluster offers GPUs."""
    if settings.use_gpu is not None:
        return settings.use_gpu
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _dashboard_up(url: str) -> bool:
    """Whether the dashboard answers at all (Ray's token auth may answer 401: still up)."""
    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def _state_file(settings: Settings) -> Path:
    return settings.home / "ray.json"


def _ray_cli() -> str:
    return shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"


def start_embedded_head(settings: Settings) -> RayCluster:
    state = _state_file(settings)
    if state.exists():
        known = RayCluster(**json.loads(state.read_text()))
        if _dashboard_up(known.dashboard_url):
            logger.info("reusing the embedded Ray head at %s", known.address)
            return known
    gcs_port, dashboard_port = free_port(), free_port()
    # Every port Ray would otherwise take by default is chosen free, so the embedded head
    # can run beside another Ray on the same machine (a second FTAAS_HOME, a test run).
    fixed_port_options = [
        f"--{option}={free_port()}"
        for option in (
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "metrics-export-port",
            "runtime-env-agent-port",
            "ray-client-server-port",
        )
    ]
    command = [
        _ray_cli(), "start", "--head",
        *fixed_port_options,
        f"--port={gcs_port}",
        f"--num-cpus={settings.ray_num_cpus}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        "--disable-usage-stats",
    ]  # fmt: skip
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **RAY_ENV}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    cluster = RayCluster(f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}")
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps(cluster.__dict__))
    deadline = time.monotonic() + 60
    while not _dashboard_up(cluster.dashboard_url):
        if time.monotonic() > deadline:
            raise RuntimeError("the embedded Ray head did not open its dashboard in 60 s")
        time.sleep(0.5)
    return cluster


def connect(settings: Settings) -> RayCluster:
    """Start or join the cluster, and connect this process to it as a driver."""
    os.environ.update(RAY_ENV)
    import ray

    if settings.ray_address:
        context = ray.init(address=settings.ray_address, ignore_reinit_error=True)
        cluster = RayCluster(settings.ray_address, f"http://{context.dashboard_url}")
    else:
        cluster = start_embedded_head(settings)
        ray.init(address=cluster.address, ignore_reinit_error=True, log_to_driver=False)
    return cluster


def _head_processes(gcs_address: str) -> list[psutil.Process]:
    port = gcs_address.rsplit(":", 1)[1]
    # Ray's processes name the GCS by the node's IP, whatever address we joined by.
    marker = re.compile(rf"(gcs[-_a-z]*[= ]\S*:{port}|--gcs_server_port={port}|--port={port})\b")
    roots = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "ray" in cmdline and marker.search(cmdline):
            roots.append(process)
    found = {p.pid: p for p in roots}
    for root in roots:
        with contextlib.suppress(psutil.Error):
            found.update({child.pid: child for child in root.children(recursive=True)})
    found.pop(os.getpid(), None)
    return list(found.values())


def stop_embedded_head(settings: Settings) -> None:
    """End the embedded head and everything it runs, leaving any other Ray alone."""
    state = _state_file(settings)
    if not state.exists():
        return
    cluster = RayCluster(**json.loads(state.read_text()))
    processes = _head_processes(cluster.address)
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=10)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    state.unlink(missing_ok=True)
