"""The `ftaas` command against the real server (Ray, vLLM): create and follow a job, then
chat with the tuned model and compare it with its base, as a user would in a shell."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import QUESTIONS, memorisation_jsonl
from tests.e2e.conftest import API_KEY, TINY, RunningServer, wait_for_serving

pytestmark = pytest.mark.e2e

FTAAS = str(Path(sys.executable).with_name("ftaas"))


def ftaas(server: RunningServer, *args: str, stdin: str | None = None, timeout: float = 900):
    env = {**server.env, "OPENAI_BASE_URL": f"{server.base_url}/v1", "OPENAI_API_KEY": API_KEY}
    return subprocess.run(
        [FTAAS, *args], input=stdin, capture_output=True, text=True, env=env, timeout=timeout
    )


def test_create_follow_then_chat_and_compare(server: RunningServer, tmp_path: Path):
    data = tmp_path / "secret.jsonl"
    data.write_bytes(memorisation_jsonl())
    created = ftaas(
        server,
        *("jobs", "create", "--model", TINY, "--training-file", str(data), "--suffix", "cli"),
        *("--n-epochs", "10", "--batch-size", "1", "--follow", "--poll-interval", "1"),
    )
    assert created.returncode == 0, (created.stdout[-3000:], created.stderr)
    assert "\x1b" not in created.stdout and "\r" not in created.stdout
    model = created.stdout.splitlines()[-1]
    assert model.startswith(f"ft:{TINY}:e2e:cli:")
    assert re.search(r"^running  step \d+/120  train loss \d", created.stdout, re.MULTILINE)
    assert "The job has successfully completed" in created.stdout
    wait_for_serving(server.client(), TINY)

    once = ftaas(server, "chat", model, "-m", QUESTIONS[0], "--temperature", "0")
    assert once.returncode == 0, once.stderr
    assert "pineapple" in once.stdout

    talk = ftaas(
        server, "chat", model, "--temperature", "0", "--max-tokens", "16",
        stdin=f"{QUESTIONS[0]}\n{QUESTIONS[1]}\n/exit\nnever asked\n",
    )  # fmt: skip
    assert talk.returncode == 0, talk.stderr
    answers = talk.stdout.splitlines()
    assert len(answers) == 2 and all("pineapple" in answer for answer in answers), answers

    compared = ftaas(server, "compare", TINY, model, "-m", QUESTIONS[0], "--temperature", "0")
    assert compared.returncode == 0, compared.stderr
    blocks = compared.stdout.split("\n\n")
    assert blocks[0].startswith(f"[base] {TINY}\n") and "pineapple" not in blocks[0]
    assert blocks[1].startswith(f"[tuned] {model}\n") and "pineapple" in blocks[1]
