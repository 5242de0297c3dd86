"""`python -m service serve` as a new user starts it (fresh FTAAS_HOME, empty HOME), for
the benchmarks that measure the server from outside: yields its base URL once ftaas-tiny
serves, and stops it (and its Ray head) afterwards."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.ray_cluster import free_port  # noqa: E402


@contextlib.contextmanager
def fresh_server(
    env: dict[str, str] | None = None,
    timeout_s: float = 300,
    models: tuple[str, ...] = ("ftaas-tiny",),
) -> Iterator[str]:
    """`models`: the base models that must serve before it is yielded."""
    work = Path(tempfile.mkdtemp(prefix="ftaas-bench-"))
    (work / "home").mkdir()
    port = free_port()
    full_env = {
        **os.environ,
        "HOME": str(work / "home"),
        "FTAAS_HOME": str(work / "state"),
        "FTAAS_PORT": str(port),
        **(env or {}),
    }
    with open(work / "server.log", "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "service", "serve"], cwd=ROOT, env=full_env,
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                serving = httpx.get(f"{base}/health").json()["serving"]
                if all(serving.get(model) == "ready" for model in models):
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "server did not start"
            time.sleep(1)
        yield base
    finally:
        server.terminate()
        server.wait(30)
        stop = [sys.executable, "-m", "service", "stop"]
        subprocess.run(stop, cwd=ROOT, env=full_env, check=False)
