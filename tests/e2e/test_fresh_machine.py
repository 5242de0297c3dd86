"""A machine that never ran ftaas: no Ray token anywhere, an empty HOME, a new FTAAS_HOME.

The session's server (tests/e2e/conftest.py) starts exactly so; this checks that it made
its own Ray token where it keeps its state, answers chat, and touched nothing in HOME."""

from __future__ import annotations

import json
import stat
import time
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.conftest import REAL, TINY, RunningServer, wait_for_serving

pytestmark = pytest.mark.e2e


def test_server_started_from_nothing_answers_chat(server: RunningServer):
    assert not {"RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"} & server.env.keys()

    client = server.client()
    wait_for_serving(client, "ftaas-tiny")
    reply = client.chat.completions.create(
        model="ftaas-tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=4
    )
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens == 4

    # The embedded head's token: made by ftaas under FTAAS_HOME, readable by its owner only.
    token = server.token_path
    assert token.is_relative_to(server.home)
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert stat.S_IMODE(token.parent.stat().st_mode) == 0o700
    assert len(token.read_text()) == 64
    # Ray's sessions and logs are the server's own too, not the machine-wide /tmp/ray.
    temp_dir = json.loads((server.home / "ray.json").read_text())["temp_dir"]
    assert Path(temp_dir) == server.home / "ray" or Path(temp_dir).name.startswith("ftaas-ray-")
    assert list(server.user_home.iterdir()) == []

    deadline = time.monotonic() + 120  # the engine answers; its deploy call then returns
    while True:
        with urllib.request.urlopen(f"{server.base_url}/health", timeout=5) as health:
            serving = json.load(health)["serving"]
        if serving[TINY] == "ready" or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert serving[TINY] == "ready"
    assert set(serving) == {TINY, REAL}  # the real model: built, then deployed, meanwhile
    log = server.log.read_text()
    assert "ftaas is ready: base_url " in log
    first_start = log.split("ftaas is ready: base_url ")[0]
    assert "Traceback" not in first_start
