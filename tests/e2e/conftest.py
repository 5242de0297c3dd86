"""One real server per test session (embedded Ray head, vLLM engine), driven by the SDK."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from openai import APIStatusError, OpenAI

from service.ray_cluster import free_port

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class RunningServer:
    base_url: str
    home: Path
    log: Path

    def client(self) -> OpenAI:
        return OpenAI(base_url=f"{self.base_url}/v1", api_key="test-key", max_retries=0)


def _wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"server not healthy in {timeout} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    home = tmp_path_factory.mktemp("ftaas-home")
    port = free_port()
    env = {**os.environ, "FTAAS_HOME": str(home), "FTAAS_PORT": str(port)}
    env.pop("FTAAS_API_KEYS", None)
    log = home / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "serve"], cwd=ROOT, env=env, stdout=out, stderr=out
        )
    running = RunningServer(f"http://127.0.0.1:{port}", home, log)
    try:
        _wait_healthy(running.base_url, process, log, timeout=180)
        yield running
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        subprocess.run([sys.executable, "-m", "service", "stop"], cwd=ROOT, env=env, check=False)


def wait_for_serving(client: OpenAI, model: str, timeout: float = 300) -> None:
    """The engine starts in the background: wait until the base model answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=1
            )
            return
        except APIStatusError as error:
            if error.status_code != 503 or time.monotonic() > deadline:
                raise
            time.sleep(2)
