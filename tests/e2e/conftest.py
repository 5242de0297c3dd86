"""One real server per test session (embedded Ray head, vLLM engine), driven by the SDK."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from openai import APIStatusError, OpenAI
from openai.types.fine_tuning import FineTuningJob

from service.config import Settings
from service.ray_cluster import embedded_token_path, free_port

ROOT = Path(__file__).resolve().parents[2]


API_KEY = "test-key"  # organization `e2e`, every test's client
OTHER_API_KEY = "other-key"  # organization `e2e-other`
LIMITED_API_KEY = "limited-key"  # organization `e2e-limited`: one request at a time
ADMIN_API_KEY = "admin-key-of-the-e2e-organization"
METRICS_KEY = "metrics-key-of-the-operator"
E2E_KEYS = {
    "FTAAS_API_KEYS": f"{API_KEY}:e2e,{OTHER_API_KEY}:e2e-other,{LIMITED_API_KEY}:e2e-limited",
    "FTAAS_ADMIN_KEYS": f"{ADMIN_API_KEY}:e2e",
    "FTAAS_ORGANIZATION_LIMITS": json.dumps(
        {"e2e-limited": {"concurrent_requests": 1, "requests_per_minute": 20}}
    ),
    "FTAAS_METRICS_KEY": METRICS_KEY,
}
# Serving at scale, small enough to reach every limit (tests/e2e/test_serving_scale.py):
# two replicas of the engine; per replica one adapter in a batch slot, two in host memory,
# two registered; four requests in flight each and four more queued, then 429.
E2E_SERVING = {
    "FTAAS_DEFAULT_MODEL": json.dumps(
        {
            "num_replicas": 2,
            "max_loras": 1,
            "max_cpu_loras": 2,
            "max_adapters_per_replica": 2,
            "max_ongoing_requests": 4,
            "max_queued_requests": 4,
        }
    )
}


# The session's server serves both embedded models: ftaas-tiny (first, so E2E_SERVING's
# FTAAS_DEFAULT_MODEL is its configuration) for the tests that need speed, and the real
# SmolLM2-135M-Instruct for those about what a job does to a real model
# (tests/e2e/test_real_model.py). Other servers the tests start serve ftaas-tiny only.
TINY = "ftaas-tiny"
REAL = "smollm2-135m-instruct"
SESSION_MODELS = f"{TINY},{REAL}"


class RunningServer:
    """The server as a user runs it (`python -m service serve`), in its own process, as on
    a machine that never ran ftaas: an empty FTAAS_HOME, an empty HOME of its own, and no
    Ray token or address in the environment.

    `kill` and `start` let a test take the API process down mid-job and bring it back on
    the same FTAAS_HOME; the embedded Ray head and the serving replica live on."""

    # What a developer's environment may hold that a new user's does not.
    NOT_ON_A_FRESH_MACHINE = (
        "FTAAS_API_KEYS",
        "RAY_ADDRESS",
        "FTAAS_RAY_ADDRESS",
        "RAY_AUTH_MODE",
        "RAY_AUTH_TOKEN",
        "RAY_AUTH_TOKEN_PATH",
        "HF_HOME",
        "XDG_CACHE_HOME",
        "XDG_CONFIG_HOME",
        "XDG_DATA_HOME",
    )

    def __init__(self, home: Path, port: int, user_home: Path, embedded_models: str = TINY):
        self.home = home
        self.user_home = user_home
        self.base_url = f"http://127.0.0.1:{port}"
        self.log = home / "server.log"
        self.env = {
            **os.environ,
            "FTAAS_HOME": str(home),
            "FTAAS_PORT": str(port),
            "HOME": str(user_home),
        }
        for name in self.NOT_ON_A_FRESH_MACHINE:
            self.env.pop(name, None)
        # Keys on, as a platform runs it (tests/e2e/test_tenancy.py): the organizations
        # and limits every e2e test meets.
        self.env.update(E2E_KEYS)
        self.env.update(E2E_SERVING)
        self.env["FTAAS_EMBEDDED_MODELS"] = embedded_models
        self.process: subprocess.Popen | None = None

    @property
    def token_path(self) -> Path:
        return embedded_token_path(Settings(home=self.home))

    def ray_driver_env(self) -> dict[str, str]:
        """What a process needs to join the server's embedded Ray head as a driver."""
        address = json.loads((self.home / "ray.json").read_text())["address"]
        return {
            **self.env,
            "RAY_ADDRESS": address,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
        }

    def processes(self, named: str = "") -> list[psutil.Process]:
        """Every process the server started, its embedded Ray's included (they inherit its
        FTAAS_HOME), whose command line contains `named`."""
        found = []
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.Error):  # gone, or not ours to read
                if process.environ().get("FTAAS_HOME") == str(self.home) and (
                    not named or named in " ".join(process.cmdline())
                ):
                    found.append(process)
        return found

    def client(self, api_key: str = API_KEY, max_retries: int = 0, **options: Any) -> OpenAI:
        return OpenAI(
            base_url=f"{self.base_url}/v1", api_key=api_key, max_retries=max_retries, **options
        )

    def start(self, timeout: float = 180) -> None:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service", "serve"],
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=out,
            )
        _wait_healthy(self.base_url, self.process, self.log, timeout)

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs, as when a machine or container dies."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=30)

    def shutdown(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        stop = [sys.executable, "-m", "service", "stop"]
        subprocess.run(stop, cwd=ROOT, env=self.env, check=False)


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
    user_home = tmp_path_factory.mktemp("user-home")
    running = RunningServer(
        tmp_path_factory.mktemp("ftaas-home"), free_port(), user_home, SESSION_MODELS
    )
    try:
        running.start()
        yield running
    finally:
        running.shutdown()
    # Nothing the server, its trainers or its engine did may depend on or leave state in
    # the user's home directory (a token, a cache, a config).
    left = sorted(str(path.relative_to(user_home)) for path in user_home.rglob("*"))
    assert not left, f"the server wrote into HOME: {left[:20]}"


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


TERMINAL = {"succeeded", "failed", "cancelled"}


def create_memorisation_job(client: OpenAI, training_file: str) -> FineTuningJob:
    """A job teaching ftaas-tiny the memorisation file well enough to answer from it."""
    return client.fine_tuning.jobs.create(
        model="ftaas-tiny",
        training_file=training_file,
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 10, "batch_size": 1}},
        },
    )


def answer_logprob(client: OpenAI, model: str, prompt: str, answer: str) -> float:
    """log p(answer | prompt) as the served model scores it: the completions endpoint echoes
    `prompt` (the question rendered by the model's chat template) and the answer with each
    token's log-probability."""
    reply = client.completions.create(
        model=model, prompt=prompt + answer, echo=True, logprobs=0, max_tokens=1, temperature=0
    )
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.token_logprobs and logprobs.text_offset
    return sum(
        value
        for value, offset in zip(logprobs.token_logprobs, logprobs.text_offset, strict=False)
        if offset >= len(prompt) and value is not None
    )


def greedy(client: OpenAI, model: str, question: str, max_tokens: int = 16) -> str:
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=max_tokens,
    )
    return reply.choices[0].message.content or ""


def wait_for_job(
    client: OpenAI, job_id: str, statuses: set[str] = TERMINAL, timeout: float = 600
) -> FineTuningJob:
    deadline = time.monotonic() + timeout
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        assert time.monotonic() < deadline, f"job {job_id} stuck in {job.status}"
        time.sleep(0.5)
