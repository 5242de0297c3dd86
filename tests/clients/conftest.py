"""A real ftaas API for the command to talk to: the app of tests/service/conftest.py (real
SQLite job store and artifact store, no Ray, serving off) under uvicorn on a free loopback
port, in a thread of the test process. The test plays Ray and the trainer: it steps the
reconciler and writes the trainer's progress records, as tests/service/test_reconciler.py
does, while `ftaas` runs in a subprocess as a user would run it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from openai import OpenAI

from service.config import Settings
from service.fine_tuning.reconciler import Reconciler
from service.ray_cluster import free_port
from tests.service.conftest import api_client, parts  # noqa: F401 (a fixture)
from tests.service.fakes import FakeLauncher
from training.progress import ProgressLog

FTAAS = str(Path(sys.executable).with_name("ftaas"))


@pytest.fixture
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """SQLite, serving off; a test may add settings (`indirect` parametrization)."""
    return Settings(home=tmp_path, serving_enabled=False, **getattr(request, "param", {}))


@dataclass
class LiveServer:
    base_url: str
    sdk: OpenAI
    parts: dict[str, Any]
    user_home: Path

    @property
    def reconciler(self) -> Reconciler:
        return self.parts["reconciler"]  # type: ignore[no-any-return]

    @property
    def ray(self) -> FakeLauncher:
        return self.parts["launcher"]  # type: ignore[no-any-return]

    def tick(self) -> None:
        report = self.reconciler.tick()
        assert not report.errors, report.errors

    def trainer(self, job_id: str) -> ProgressLog:
        from service.db import JobRow

        with self.parts["db"].session() as session:
            job = session.get(JobRow, job_id)
            assert job is not None and job.output_dir is not None
            return ProgressLog(self.parts["blobs"], job.output_dir)

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("OPENAI_") and key not in ("TERM", "COLUMNS")
        }
        env.update(HOME=str(self.user_home), OPENAI_BASE_URL=self.base_url, **extra)
        return env

    def ftaas(self, *args: str, stdin: str | None = None, **popen: Any) -> subprocess.Popen:
        """`ftaas ARGS` through pipes (stdout is not a terminal)."""
        return subprocess.Popen(
            [FTAAS, *args],
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env(),
            **popen,
        )

    def run(self, *args: str, stdin: str | None = None, timeout: float = 60) -> Finished:
        process = self.ftaas(*args, stdin=stdin)
        out, err = process.communicate(stdin.encode() if stdin else None, timeout=timeout)
        return Finished(process.returncode, out, err)

    def wait_for_job(self, timeout: float = 30) -> str:
        """The id of the first job the command created."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = self.sdk.fine_tuning.jobs.list().data
            if jobs:
                return jobs[0].id
            time.sleep(0.05)
        raise AssertionError("the command created no job")


@dataclass
class Finished:
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def lines(self) -> list[str]:
        return self.stdout.decode().splitlines()

    @property
    def error(self) -> str:
        return self.stderr.decode()


@pytest.fixture
def server(settings: Settings, parts: dict[str, Any], tmp_path: Path) -> Iterator[LiveServer]:  # noqa: F811
    app = api_client(settings, parts).app
    port = free_port()
    # lifespan off: no Ray, no scheduler; the test steps the reconciler itself.
    config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning")
    uvicorn_server = uvicorn.Server(config)
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uvicorn_server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    base_url = f"http://127.0.0.1:{port}/v1"
    user_home = tmp_path / "user-home"
    user_home.mkdir()
    sdk = OpenAI(base_url=base_url, api_key="test", max_retries=0)
    try:
        yield LiveServer(base_url, sdk, parts, user_home)
    finally:
        uvicorn_server.should_exit = True
        thread.join(timeout=10)
