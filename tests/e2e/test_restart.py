"""Nothing accepted is lost when the API process dies: a job that finishes while the
server is down is reconciled by the restarted server, and its model is served."""

from __future__ import annotations

import re
import time

import pytest

from tests.conftest import QUESTIONS, memorisation_jsonl
from tests.e2e.conftest import RunningServer, greedy, wait_for_job, wait_for_serving
from training.progress import ProgressLog
from training.storage import LocalStore

pytestmark = pytest.mark.e2e


def _wait_for_outcome(progress_log: ProgressLog, timeout: float = 600) -> str:
    """The trainer's own log, read while no API process is there to read it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in progress_log.read_from(0).records:
            if record.type in ("succeeded", "failed"):
                return record.type
        time.sleep(1)
    raise AssertionError(f"no outcome in {progress_log.folder} after {timeout} s")


def test_job_finished_while_the_api_was_killed_is_reconciled(server: RunningServer):
    client = server.client()
    upload = client.files.create(file=("secret.jsonl", memorisation_jsonl()), purpose="fine-tune")
    client.files.wait_for_processing(upload.id)
    job = client.fine_tuning.jobs.create(
        model="ftaas-tiny", training_file=upload.id, suffix="restart"
    )
    running = wait_for_job(client, job.id, {"running", "succeeded", "failed"})
    assert running.status == "running"
    events_before = {e.id for e in client.fine_tuning.jobs.list_events(job.id, limit=100)}
    head_before = (server.home / "ray.json").read_text()
    token_before = server.token_path.read_bytes()
    log_offset = server.log.stat().st_size

    server.kill()
    store = LocalStore(server.home / "blobs")
    outcome = _wait_for_outcome(ProgressLog(store, f"jobs/{job.id}/attempt-1"))
    assert outcome == "succeeded"
    server.start()
    # The restarted API joined the same head with the same token, and kept the engine.
    assert (server.home / "ray.json").read_text() == head_before
    assert server.token_path.read_bytes() == token_before
    restart_log = server.log.read_text()[log_offset:]
    assert "reusing the embedded Ray head" in restart_log

    client = server.client()
    assert upload.id in {f.id for f in client.files.list()}
    finished = wait_for_job(client, job.id)
    assert finished.status == "succeeded", finished.error
    assert ":restart:" in (finished.fine_tuned_model or "")
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    assert events_before <= {e.id for e in events}  # nothing seen before the kill is lost
    steps = sorted(e.data["step"] for e in events if e.type == "metrics")  # type: ignore[index]
    assert steps == list(range(1, steps[-1] + 1))  # every step, none twice
    assert events[0].message == "The job has successfully completed"
    assert finished.fine_tuned_model in {m.id for m in client.models.list()}

    wait_for_serving(client, "ftaas-tiny")
    assert "pineapple" in greedy(client, finished.fine_tuned_model or "", QUESTIONS[0])
    # The gateway asks the running engine what it was deployed with before it says so.
    decided = re.compile(r"serving application llm-ftaas-tiny (already running|runs config)")
    deadline = time.monotonic() + 120
    while not decided.search(restart_log := server.log.read_text()[log_offset:]):
        assert time.monotonic() < deadline, "the gateway never decided about the engine"
        time.sleep(1)
    assert "already running: reusing it" in restart_log, "the engine was redeployed"
    assert "deploying serving application" not in restart_log
