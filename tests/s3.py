"""A real S3 endpoint for the tests: moto's server mode (S3 over HTTP, as boto3 talks to
AWS, MinIO or Ceph), started on a free port for the session. Each test gets a bucket of
its own; clients find the endpoint the standard AWS way (`AWS_ENDPOINT_URL`)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "ftaas-test",
    "AWS_SECRET_ACCESS_KEY": "ftaas-test-secret",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class S3Server:
    def __init__(self, port: int):
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to reach it (no file under HOME)."""
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=2)
                return
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("moto's S3 server did not start") from None
                time.sleep(0.2)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def new_bucket(self) -> str:
        name = f"ftaas-{uuid.uuid4().hex[:12]}"
        with environment(self.env):
            import boto3

            boto3.client("s3").create_bucket(Bucket=name)
        return name


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    from service.ray_cluster import free_port

    server = S3Server(free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """This test's process talks to the session's S3 server."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server
