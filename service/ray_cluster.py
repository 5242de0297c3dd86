"""Which Ray cluster the service uses: `RAY_ADDRESS`, or an embedded head it starts.

The embedded head runs as its own processes (`ray start --head`), not inside the API
process, so training jobs and serving replicas outlive a restart of the API; its address
is kept under FTAAS_HOME and reused by the next start. `stop_embedded_head` ends it
(and only it: `ray stop` would end every Ray on the machine).

Everything the embedded head keeps lives under FTAAS_HOME, never in the user's home
directory or Ray's shared `/tmp/ray`: its token authentication secret
(`secrets/ray_auth_token`, mode 0600 in a 0700 folder, made on first start) and its
session folders and logs (`ray/`, or a short folder named after FTAAS_HOME under the
system temp folder when FTAAS_HOME's path is too long for Ray's Unix sockets; Ray makes
that folder world-writable, hence the separate one for the secret).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

from service.config import Settings
from training.node_cache import ENV as NODE_CACHE_ENV

logger = logging.getLogger(__name__)

# Ray's own variables for token authentication (https://docs.ray.io/en/latest/ray-security/
# token-auth.html): the mode, the token itself, or a file holding it.
AUTH_MODE = "RAY_AUTH_MODE"
AUTH_TOKEN = "RAY_AUTH_TOKEN"
AUTH_TOKEN_PATH = "RAY_AUTH_TOKEN_PATH"
# Ray's Unix sockets live under its temp folder, in `session_<date>_<pid>/sockets/...`
# (about 65 characters), and a socket path may not exceed 107 bytes.
MAX_TEMP_DIR_CHARS = 40


class RayAuthError(RuntimeError):
    """The cluster ftaas joins wants a token and none was given."""


@dataclass(frozen=True)
class RayCluster:
    address: str
    dashboard_url: str
    # The embedded head's session folder root (its logs are in `session_latest/logs`).
    temp_dir: str | None = None


def use_gpu(settings: Settings) -> bool:
    """FTAAS_USE_GPU if set, else whether the connected cluster offers GPUs."""
    if settings.use_gpu is not None:
        return settings.use_gpu
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


# Ray's workers listen on 10002-19999 (its defaults), and every outgoing connection and
# every bind to port 0 takes a port of the kernel's ephemeral range: a port chosen in
# either may be taken before the Ray component it was chosen for binds it (seen here: the
# dashboard agent lost its port to another process, and no job could be submitted until
# the head was restarted). Ports are chosen between the two.
FIRST_CHOSEN_PORT = 20000
LINUX_EPHEMERAL_PORTS = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _first_ephemeral_port() -> int:
    try:
        return int(LINUX_EPHEMERAL_PORTS.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default (macOS and Windows start at 49152)


def free_ports(count: int) -> list[int]:
    """`count` different ports free on every interface, below the ephemeral range. Every
    socket stays bound until all are chosen: one call at a time, the system may hand out
    a port it just handed out (seen here: Ray refused to start with one port given to two
    of its components)."""
    candidates = list(range(FIRST_CHOSEN_PORT, min(_first_ephemeral_port(), 32768)))
    random.shuffle(candidates)  # two processes choosing at once rarely try the same
    with contextlib.ExitStack() as stack:
        chosen: list[int] = []
        for port in candidates:
            sock = stack.enter_context(socket.socket())
            try:
                sock.bind(("", port))
            except OSError:
                continue
            chosen.append(port)
            if len(chosen) == count:
                return chosen
        # A machine whose ephemeral range leaves no room: whatever the system hands out.
        sockets = [stack.enter_context(socket.socket()) for _ in range(count - len(chosen))]
        for sock in sockets:
            sock.bind(("", 0))
        return chosen + [sock.getsockname()[1] for sock in sockets]


def free_port() -> int:
    return free_ports(1)[0]


def embedded_token_path(settings: Settings) -> Path:
    return settings.home / "secrets" / "ray_auth_token"


def ensure_embedded_token(settings: Settings) -> Path:
    """The embedded head's token file, made (0600, 256 random bits) the first time.

    Written beside its final name and hard-linked into place, so a second process starting
    at the same moment either makes the token or finds the complete one, never half of it.
    """
    path = embedded_token_path(settings)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    if not path.exists():
        fd, draft = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
        try:
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_hex(32))  # the format `ray get-auth-token` makes
            with contextlib.suppress(FileExistsError):
                os.link(draft, path)
        finally:
            os.unlink(draft)
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)
    return path


def ray_auth_env(settings: Settings) -> dict[str, str]:
    """The variables every process that talks to the cluster needs (driver, job client,
    trainer, serving replicas).

    Embedded head: ftaas's own token file, and nothing else (a token in the environment
    meant for another cluster is not passed on). `RAY_ADDRESS`: the cluster's token as
    Ray documents it, `RAY_AUTH_TOKEN` or `RAY_AUTH_TOKEN_PATH`; `RAY_AUTH_MODE=disabled`
    joins a cluster without token authentication.
    """
    if not settings.ray_address:
        return {AUTH_MODE: "token", AUTH_TOKEN_PATH: str(ensure_embedded_token(settings))}
    mode = os.environ.get(AUTH_MODE, "token")
    if mode != "token":
        return {AUTH_MODE: mode}
    if os.environ.get(AUTH_TOKEN):
        return {AUTH_MODE: "token", AUTH_TOKEN: os.environ[AUTH_TOKEN]}
    token_path = os.environ.get(AUTH_TOKEN_PATH)
    if token_path and Path(token_path).is_file():
        return {AUTH_MODE: "token", AUTH_TOKEN_PATH: token_path}
    missing = f"{AUTH_TOKEN_PATH}={token_path} is not a file" if token_path else "none is set"
    raise RayAuthError(
        f"RAY_ADDRESS={settings.ray_address} needs the cluster's auth token: set {AUTH_TOKEN} "
        f"or {AUTH_TOKEN_PATH} ({missing}), or {AUTH_MODE}=disabled for a cluster without "
        "token authentication"
    )


def runtime_env_vars(auth_env: dict[str, str]) -> dict[str, str]:
    """What of `ray_auth_env` may ride in a runtime_env, which Ray's dashboard and job API
    show to whoever can reach them: the mode and a token file's path, never the token.
    Every Ray worker inherits its node's environment, where a cluster keeps the token
    (KubeRay gives each container RAY_AUTH_TOKEN)."""
    return {k: v for k, v in auth_env.items() if k != AUTH_TOKEN}


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


def _read_state(settings: Settings) -> RayCluster | None:
    state = _state_file(settings)
    if not state.exists():
        return None
    known = json.loads(state.read_text())
    return RayCluster(**{k: v for k, v in known.items() if k in RayCluster.__dataclass_fields__})


def ray_temp_dir(settings: Settings) -> Path:
    """Where the embedded head keeps its sessions and logs: under FTAAS_HOME when the path
    is short enough for Ray's sockets, else a folder of its own named after FTAAS_HOME."""
    preferred = settings.home / "ray"
    if len(str(preferred)) <= MAX_TEMP_DIR_CHARS:
        return preferred
    digest = hashlib.sha256(str(settings.home).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"ftaas-ray-{digest}"


def ray_log_dir(cluster: RayCluster) -> str:
    if cluster.temp_dir is None:
        return "the Ray cluster's own logs"
    return str(Path(cluster.temp_dir) / "session_latest" / "logs")


def _ray_cli() -> str:
    return shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"


def _last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines()]
    lines = [line for line in lines if line and not line.startswith("---")]
    return lines[-1] if lines else "no output"


# Components of a head that would otherwise take a fixed default port.
HEAD_PORT_OPTIONS = (
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
    "ray-client-server-port",
)


def head_ports(count: int) -> tuple[list[int], list[str]]:
    """`count` free ports for the caller (GCS, dashboard...) and `ray start --head` options
    giving one to every other component, all chosen together (none handed out twice), so
    a head can run beside another Ray on the same machine (a second FTAAS_HOME, a test)."""
    ports = free_ports(count + len(HEAD_PORT_OPTIONS))
    options = [f"--{o}={p}" for o, p in zip(HEAD_PORT_OPTIONS, ports[count:], strict=True)]
    return ports[:count], options


def start_embedded_head(settings: Settings) -> RayCluster:
    known = _read_state(settings)
    if known is not None and _dashboard_up(known.dashboard_url):
        logger.info("reusing the embedded Ray head at %s", known.address)
        return known
    (gcs_port, dashboard_port), port_options = head_ports(2)
    temp_dir = ray_temp_dir(settings)
    temp_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    command = [
        _ray_cli(), "start", "--head",
        *port_options,
        f"--port={gcs_port}",
        f"--num-cpus={settings.ray_num_cpus}",
        f"--temp-dir={temp_dir}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        "--disable-usage-stats",
    ]  # fmt: skip
    if settings.ray_head_resources:
        command.append(f"--resources={json.dumps(settings.ray_head_resources)}")
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        **ray_auth_env(settings),
        # Jobs run `python`: this virtualenv's, with ftaas's dependencies.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    if settings.storage_url is None:
        # One machine: what trainers and replicas fetch, and their scratch, stay with the
        # rest of ftaas's state. (With a remote store, the API's FTAAS_HOME holds no data
        # or weights: the node's temporary folder does, as on every other node.)
        env[NODE_CACHE_ENV] = str(settings.home / "cache" / "node")
    env.pop(AUTH_TOKEN, None)
    start_log = settings.home / "logs" / "ray-start.log"
    start_log.parent.mkdir(parents=True, exist_ok=True)
    with open(start_log, "wb") as out:
        # A session of its own: Ctrl-C on the API's terminal must not reach the head,
        # which is meant to outlive the API (training and serving run in it).
        started = subprocess.run(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    if started.returncode != 0:
        raise RuntimeError(f"`ray start` exited {started.returncode}: {_last_line(start_log)}")
    cluster = RayCluster(
        f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}", str(temp_dir)
    )
    _state_file(settings).write_text(json.dumps(cluster.__dict__))
    deadline = time.monotonic() + 60
    while not _dashboard_up(cluster.dashboard_url):
        if time.monotonic() > deadline:
            raise RuntimeError("the embedded Ray head did not open its dashboard in 60 s")
        time.sleep(0.5)
    return cluster


def connect(settings: Settings) -> RayCluster:
    """Start or join the cluster, and connect this process to it as a driver."""
    auth = ray_auth_env(settings)
    if not settings.ray_address:
        os.environ.pop(AUTH_TOKEN, None)  # meant for some other cluster, not our head
    os.environ.update(auth)  # before Ray reads its configuration in this process
    import ray

    if settings.ray_address:
        context = ray.init(address=settings.ray_address, ignore_reinit_error=True)
        cluster = RayCluster(settings.ray_address, f"http://{_dashboard_address(context)}")
    else:
        cluster = start_embedded_head(settings)
        ray.init(address=cluster.address, ignore_reinit_error=True, log_to_driver=False)
    return cluster


def _dashboard_address(context: object) -> str:
    """Where the dashboard listens, as the cluster itself records it. (In a process Ray
    started, such as a Serve replica, `ray.init` answers Ray's default port whatever the
    head was given.)"""
    from ray._private.services import get_webui_url_from_internal_kv

    return get_webui_url_from_internal_kv() or str(getattr(context, "dashboard_url", ""))


def _head_processes(cluster: RayCluster) -> list[psutil.Process]:
    port = cluster.address.rsplit(":", 1)[1]
    # Ray's processes name the GCS by the node's IP, whatever address we joined by, and
    # those of the head's session carry its temp folder in their command lines.
    marker = re.compile(
        rf"(gcs[-_a-z]*[= ]\S*:{port}|--gcs_server_port={port}|--port={port}|"
        rf"--address=\S*:{port})\b"
    )
    roots = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        in_session = cluster.temp_dir is not None and f"{cluster.temp_dir}/" in cmdline
        if "ray" in cmdline and (marker.search(cmdline) or in_session):
            roots.append(process)
    found = {p.pid: p for p in roots}
    for root in roots:
        with contextlib.suppress(psutil.Error):
            found.update({child.pid: child for child in root.children(recursive=True)})
    found.pop(os.getpid(), None)
    return list(found.values())


def stop_embedded_head(settings: Settings) -> None:
    """End the embedded head and everything it runs, leaving any other Ray alone."""
    cluster = _read_state(settings)
    if cluster is None:
        return
    stop_head(cluster)
    _state_file(settings).unlink(missing_ok=True)


def stop_head(cluster: RayCluster) -> None:
    """End this head's processes (found by its GCS port and temp folder) and their
    children; `ray stop` would end every Ray on the machine."""
    processes = _head_processes(cluster)
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=10)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
